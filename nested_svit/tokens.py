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


def pad(values: Tensor, layout: Layout, fill: float = 0.0) -> Tensor:
    """Packed ``[T, ...]`` -> padded ``[B, max_len, ...]``."""
    b, m = layout.batch_size, layout.max_len
    out = values.new_full((b, m) + tuple(values.shape[1:]), fill)
    out[layout.image_index, positions(layout)] = values
    return out


def padding_mask(layout: Layout) -> Tensor:
    """``[B, max_len]`` bool, True where a padded position holds a real token."""
    lengths = layout.offsets.diff()
    return torch.arange(layout.max_len, device=lengths.device)[None, :] < lengths[:, None]


def unpad(padded: Tensor, layout: Layout) -> Tensor:
    """Padded ``[B, max_len, ...]`` -> packed ``[T, ...]`` (integer indexing: no device sync)."""
    return padded[layout.image_index, positions(layout)]
