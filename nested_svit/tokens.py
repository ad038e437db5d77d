"""Ragged token sets: the one layout every execution path uses.

A batch of images is a set of token sequences of different lengths (different keep counts, or
different resolutions). It is stored *packed*: all tokens of all images concatenated in one
``values [T, C]`` tensor, image ``b`` owning rows ``offsets[b]:offsets[b+1]``. A dense batch
``[B, N, C]`` is the special case where every image owns ``N`` rows, so nothing downstream
distinguishes "pruned to different counts" from "different resolutions".

Only this module knows that layout; blocks see a ``Packed`` and hand its ``layout`` to attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class Layout:
    """Where each image's rows lie in a packed ``[T, C]`` tensor.

    ``lengths`` is the host copy of ``offsets.diff()``: per-image loops and ``max_len`` need it
    without a device sync.
    """

    offsets: Tensor  # [B+1] int64, on the values' device
    lengths: tuple[int, ...]  # B host ints

    @staticmethod
    def from_lengths(lengths: list[int] | tuple[int, ...], device: torch.device | str = "cpu") -> "Layout":
        lengths = tuple(int(n) for n in lengths)
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        if lengths:
            offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
        # pageable host memory: the copy is staged at once and does not wait for the device
        return Layout(offsets.to(device, non_blocking=True), lengths)

    @staticmethod
    def from_counts(counts: Tensor, lengths: Sequence[int]) -> "Layout":
        """``counts [B]`` on the device and the same numbers on the host: offsets are computed on the
        device (no host-to-device copy, no sync)."""
        offsets = torch.zeros(counts.shape[0] + 1, dtype=torch.int64, device=counts.device)
        offsets[1:] = counts.cumsum(0)
        return Layout(offsets, tuple(int(n) for n in lengths))

    @staticmethod
    def uniform(batch: int, length: int, device: torch.device | str = "cpu") -> "Layout":
        return Layout(torch.arange(batch + 1, device=device, dtype=torch.int64) * length, (length,) * batch)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @cached_property
    def max_len(self) -> int:
        return max(self.lengths, default=0)

    @cached_property
    def is_uniform(self) -> bool:
        return len(set(self.lengths)) <= 1

    @cached_property
    def starts(self) -> tuple[int, ...]:
        out, acc = [], 0
        for n in self.lengths:
            out.append(acc)
            acc += n
        return tuple(out)

    @cached_property
    def image_index(self) -> Tensor:
        """``[T]`` int64: which image each packed row belongs to (from the device offsets: no copy, no sync)."""
        return torch.repeat_interleave(torch.arange(self.batch_size, device=self.offsets.device),
                                       self.offsets.diff(), output_size=self.total)

    @cached_property
    def first_rows(self) -> Tensor:
        """``[B]`` int64: packed row of each image's first token (the class token)."""
        return self.offsets[:-1]


@dataclass(eq=False)
class Packed:
    """Tokens of a batch of images packed row-wise.

    values: ``[T, C]``; layout: per-image row ranges; index: ``[T]`` rows of the source set these
    tokens were gathered from (``None`` when this *is* the source feature map).
    """

    values: Tensor
    layout: Layout
    index: Tensor | None = None

    @staticmethod
    def from_dense(x: Tensor) -> "Packed":
        """``[B, N, C]`` -> packed view (no copy)."""
        b, n, c = x.shape
        return Packed(x.reshape(b * n, c), Layout.uniform(b, n, x.device))

    @staticmethod
    def from_list(seqs: list[Tensor]) -> "Packed":
        """Per-image ``[N_i, C]`` tensors -> packed copy."""
        return Packed(torch.cat(seqs, 0), Layout.from_lengths([s.shape[0] for s in seqs], seqs[0].device))

    def to_dense(self) -> Tensor:
        """``[B, N, C]`` view; only for layouts where every image has the same length."""
        if not self.layout.is_uniform:
            raise ValueError(f"images have different token counts {sorted(set(self.layout.lengths))}; "
                             "use .unbind() or .to_padded()")
        b = self.layout.batch_size
        return self.values.view(b, self.values.shape[0] // max(b, 1), *self.values.shape[1:])

    def unbind(self) -> list[Tensor]:
        """Per-image ``[N_i, C]`` views."""
        return list(torch.split(self.values, list(self.layout.lengths), 0))

    def with_values(self, values: Tensor) -> "Packed":
        return Packed(values, self.layout, self.index)


def keep_counts(keep: Tensor, layout: Layout) -> Tensor:
    """``[B]`` int64 number of kept rows per image for a flat ``keep [T]`` mask (bool or {0,1})."""
    keep = keep if keep.dtype == torch.bool else keep > 0.5
    if layout.is_uniform and layout.batch_size:
        return keep.view(layout.batch_size, -1).sum(1)
    counts = torch.zeros(layout.batch_size, dtype=torch.int64, device=keep.device)
    return counts.index_add_(0, layout.image_index, keep.to(torch.int64))


def true_rows(mask: Tensor, count: int) -> Tensor:
    """The indices of ``mask``'s True entries, in order, when their ``count`` is known on the host (a
    fixed count): ``mask.nonzero()`` without its device sync."""
    return torch.nonzero_static(mask.reshape(-1), size=count).squeeze(1)


def kept_rows(keep: Tensor, layout: Layout, lengths: Sequence[int] | None = None) -> tuple[Tensor, Layout]:
    """``keep [T]`` bool over ``layout``'s rows -> (``[T_kept]`` row indices in order, the kept rows'
    layout). ``lengths``: the kept count of every image when the caller knows it on the host (a method
    with fixed counts); else they are read from the device: the one host sync of a selection."""
    counts = keep_counts(keep, layout)
    lengths = counts.tolist() if lengths is None else lengths
    index = torch.nonzero_static(keep, size=sum(lengths)).squeeze(1)  # the size is known: no sync
    return index, Layout.from_counts(counts, lengths)


def gather(x: Packed, keep: Tensor | None, lengths: Sequence[int] | None = None) -> Packed:
    """Active tokens of every image: ``keep [T]`` bool over ``x``'s rows -> ``Packed`` with ``index``.
    Image order and token order within an image are preserved. ``lengths``: the kept count per image
    on the host, when known (``kept_rows``); else one host sync reads them."""
    if keep is None:
        return Packed(x.values, x.layout, None)
    index, layout = kept_rows(keep, x.layout, lengths)
    return Packed(x.values.index_select(0, index), layout, index)


def scatter(x: Packed, active: Packed, inplace: bool = False) -> Packed:
    """Write ``active`` rows back into ``x`` at ``active.index``; other rows keep their values
    (preserve). ``inplace`` avoids a copy of the feature map when autograd is not recording."""
    if active.index is None:
        return Packed(active.values, x.layout)
    if inplace:
        x.values.index_copy_(0, active.index, active.values)
        return x
    return Packed(x.values.index_copy(0, active.index, active.values), x.layout)


@dataclass(frozen=True, eq=False)
class CapacityRows:
    """The rows one block processes in capacity mode: a fixed number ``R`` of them (a static shape), so
    no kept count is read on the host. The kept rows come first, in map order; the rest are padding
    (copies of one row that is not kept, written back unchanged).

    index: ``[R]`` int64 rows of the map; valid: ``[R]`` bool (False: padding); counts: ``[B]`` int64 kept
    rows per image, on the device; slots: ``[R]`` int64 place of each row in a padded
    ``[B * max_len + 1]`` grid (image * max_len + position; padding: the spare last place);
    cu_seqlens: ``[B + 1 + P]`` int32 on the device, every image's kept rows, then the padding rows
    as sequences of at most ``max_len`` (the varlen kernels' offsets cover every row);
    overflow: ``[]`` bool on the device, True when more than ``R`` rows were kept (some were then
    cut: the caller reruns). ``batch_size``, ``max_len`` (the longest image of the map: a static
    bound) and ``capacity`` are host ints."""

    index: Tensor
    valid: Tensor
    counts: Tensor
    slots: Tensor
    cu_seqlens: Tensor
    overflow: Tensor
    batch_size: int
    max_len: int

    @property
    def capacity(self) -> int:
        return int(self.index.shape[0])


def map_slots(layout: Layout) -> Tensor:
    """``[T]`` int64: each map row's place ``image * max_len + position`` in a padded ``[B, max_len]``
    grid (computed on the device)."""
    return layout.image_index * layout.max_len + positions(layout)


def capacity_rows(keep: Tensor, layout: Layout, capacity: int, slots_of_map: Tensor) -> CapacityRows:
    """``keep [T]`` bool over ``layout``'s rows -> its first ``capacity`` kept rows and padding
    (``CapacityRows``), with no host read. ``slots_of_map``: ``map_slots(layout)``."""
    device = keep.device
    counts = keep_counts(keep, layout)
    total = keep.shape[0]
    index = torch.nonzero_static(keep, size=capacity, fill_value=total).squeeze(1)  # padding: one past the end
    valid = index < total
    spare = (~keep).to(torch.int8).argmax()  # a row not kept: padding copies it and writes it back as it was
    index = torch.where(valid, index, spare)
    grid = layout.batch_size * layout.max_len
    slots = torch.where(valid, slots_of_map[index], grid)
    ends = counts.cumsum(0).clamp(max=capacity)
    pads = -(-capacity // max(layout.max_len, 1))  # padding sequences of at most max_len rows
    pad_ends = (ends[-1:] + layout.max_len * torch.arange(1, pads + 1, device=device)).clamp(max=capacity)
    cu_seqlens = torch.cat([ends.new_zeros(1), ends, pad_ends]).to(torch.int32)
    return CapacityRows(index, valid, counts, slots, cu_seqlens, counts.sum() > capacity, layout.batch_size,
                        layout.max_len)


def scatter_capacity(x: Packed, rows: CapacityRows, gathered: Tensor, out: Tensor) -> Packed:
    """Write the block's output ``out [R, C]`` of ``rows`` into ``x`` in place (inference); padding
    rows write back the value they were gathered with (``gathered [R, C]``), so the one row they copy
    is unchanged and every write is deterministic."""
    x.values.index_copy_(0, rows.index, torch.where(rows.valid[:, None], out, gathered))
    return x


def to_nested(values: Tensor, layout: Layout) -> Tensor:
    """Packed ``[T, ...]`` -> jagged nested tensor ``[B, j, ...]`` sharing ``values``' storage."""
    return torch.nested.nested_tensor_from_jagged(values, layout.offsets, max_seqlen=layout.max_len,
                                                  min_seqlen=min(layout.lengths, default=0))


def from_nested(nt: Tensor) -> Tensor:
    """Jagged nested tensor -> packed ``values [T, ...]``."""
    return nt.values()


def positions(layout: Layout) -> Tensor:
    """``[T]`` int64: each packed row's position within its image."""
    return torch.arange(layout.total, device=layout.offsets.device) - layout.offsets[layout.image_index]


def pad(values: Tensor, layout: Layout, fill: float = 0.0, length: int | None = None) -> Tensor:
    """Packed ``[T, ...]`` -> padded ``[B, length, ...]`` (default length: ``max_len``)."""
    b, m = layout.batch_size, layout.max_len if length is None else length
    out = values.new_full((b, m) + tuple(values.shape[1:]), fill)
    out[layout.image_index, positions(layout)] = values
    return out


def padding_mask(layout: Layout, length: int | None = None) -> Tensor:
    """``[B, length]`` bool (default length: ``max_len``), True where a padded position holds a real token."""
    lengths = layout.offsets.diff()
    m = layout.max_len if length is None else length
    return torch.arange(m, device=lengths.device)[None, :] < lengths[:, None]


def unpad(padded: Tensor, layout: Layout) -> Tensor:
    """Padded ``[B, max_len, ...]`` -> packed ``[T, ...]`` (integer indexing: no device sync)."""
    return padded[layout.image_index, positions(layout)]
