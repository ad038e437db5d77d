"""Shared pieces of the baselines' token selection on packed rows."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import ViTConfig
from ..tokens import true_rows
from .base import MethodRun, segment_rank


class SubsetRun(MethodRun):
    """A method whose active set only shrinks (DynamicViT, EViT, ATS, ToMe, ATC) or is re-chosen (Evo-ViT):
    ``self.active [T]`` bool, starting with every real row (virtual slots off). ``self.options``: the
    method's options (``stack.options``)."""

    def __init__(self, block_pass) -> None:
        super().__init__(block_pass)
        self.config = block_pass.stack.config
        self.options = block_pass.stack.options
        self.stage_of_block = {b: k for k, b in enumerate(self.config.gate_blocks)}
        self.active: Tensor = ~block_pass.slot_mask
        self.active_lengths: list[int] | None = block_pass.lengths.tolist()  # host, per image (None: unknown)
        self.everything = block_pass.stack.slots == 0  # no selection yet and no virtual rows: all rows active
        self.cls = int(block_pass.stack.cls_token is not None)

    def chose(self, keep: Tensor, candidates: Tensor, lengths: list[int] | None = None) -> Tensor:
        """Record a stage's selection (``[T]`` bool kept, ``[T]`` bool candidates; ``lengths``: kept rows
        per image, when the method's counts are fixed and so known on the host); -> ``keep``."""
        self.masks.append(keep)
        self.decided.append(candidates)
        self.active = keep
        self.active_lengths = lengths
        self.everything = False
        return keep

    def host_counts(self, mask: Tensor) -> list[int] | None:
        return self.active_lengths if mask is self.active else None

    def record_counts(self, mask: Tensor, lengths: list[int]) -> None:
        if mask is self.active:
            self.active_lengths = list(lengths)

    def candidate_rows(self, mask: Tensor, count: int | None) -> Tensor:
        """``mask``'s rows: without a sync when their ``count`` is known on the host."""
        return true_rows(mask, count) if count is not None else mask.nonzero().squeeze(1)

    def base_patches(self) -> list[int]:
        """Each image's patch-token count ``N0`` on the host (the base of the fixed keep counts)."""
        return [n - self.cls for n in self.block_pass.lengths.tolist()]

    def before_block(self, i: int, x) -> Tensor | None:
        return None if self.everything else self.active

    def rows_mask(self, rows: Tensor) -> Tensor:
        mask = torch.zeros_like(self.active)
        mask[rows] = True
        return mask

    def readout_mask(self) -> Tensor | None:
        return self.active

    def top_k(self, scores: Tensor, rows: Tensor, image: Tensor, k: Tensor) -> Tensor:
        """``[T]`` bool: of the candidate ``rows`` (of images ``image``), the ``k[image]`` best
        ``scores`` per image (ties: lower row first)."""
        keep = torch.zeros_like(self.active)
        keep[rows] = segment_rank(scores, image, k.shape[0]) < k[image]  # integer rows: no device sync
        return keep


def merge_wavg(x: Tensor, size: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """ToMe's ``merge_wavg`` on rows: each row ``src[j]`` merged into row ``dst[j]`` by the size-weighted
    mean ``sum(size * x) / sum(size)``, written into ``x [T, C]`` at ``dst`` (in place). -> the sizes
    ``[T]`` after the merge (``dst`` rows hold the sums; ``src`` rows are dropped by the caller).

    A row that takes several sources appears in ``dst`` once per source. Writing ``x[dst]`` then stores
    the same mean several times, which is harmless forward, but its backward would hand that row's
    gradient to every copy, counting it once per source. So with gradients each row is written once."""
    weighted = x * size[:, None].to(x.dtype)
    total = weighted.index_add(0, dst, weighted[src])
    merged = size.index_add(0, dst, size[src])
    if x.requires_grad:
        is_dst = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        is_dst[dst] = True
        x.copy_(torch.where(is_dst[:, None], total / merged[:, None].to(x.dtype), x))
    else:
        x[dst] = total[dst] / merged[dst, None].to(x.dtype)
    return merged


class MergeRun(SubsetRun):
    """A method that merges rows between the attention and the MLP of its blocks (ToMe, ATC): ``size [T]``,
    how many tokens each row stands for; ``log_size``, the key bias of proportional attention (None: none);
    ``owner [T]``, the row that holds each row's token now (itself until it is merged)."""

    def __init__(self, block_pass) -> None:
        super().__init__(block_pass)
        self.size = torch.ones(block_pass.layout.total, dtype=torch.float32, device=block_pass.protect.device)
        self.log_size: Tensor | None = None
        self.owner = torch.arange(block_pass.layout.total, device=block_pass.protect.device)

    def spread(self, values: Tensor) -> Tensor:
        """Every row given its owner's value (the authors' ``unmerge``: a spatial layer sees the full grid)."""
        return values if self.everything else values[self.owner]

    def gather_back(self, values: Tensor) -> Tensor:
        """After a spatial layer wrote every row of a spread map: each owner row becomes the mean of its
        rows (the authors' re-merge, size-weighted means from sizes of 1); other rows are left as given."""
        if self.everything:
            return values
        members = torch.zeros(values.shape[0], dtype=values.dtype, device=values.device)
        members = members.index_add(0, self.owner, torch.ones_like(members))
        total = torch.zeros_like(values).index_add(0, self.owner, values)
        owns = (members > 0)[:, None]
        return torch.where(owns, total / members.clamp(min=1)[:, None], values)

    def has_mid_selection(self, i: int) -> bool:
        return i in self.stage_of_block

    def key_bias(self, i: int) -> Tensor | None:
        return self.log_size

    def merge(self, y: Tensor, src: Tensor, dst: Tensor, proportional: bool = True) -> None:
        """Rows ``src`` merged into rows ``dst`` of ``y [T, C]`` (``merge_wavg``, in place); the sizes add
        up and, when ``proportional``, their logs become the key bias of the next blocks."""
        self.size = merge_wavg(y, self.size, src, dst)
        if proportional:
            self.log_size = self.size.log()
        target = torch.arange(y.shape[0], device=y.device)
        target[src] = dst
        self.owner = target[self.owner]


def keep_count(base: Tensor, rate: float, mode: str) -> Tensor:
    """Per-image kept counts: ``int(base * rate)`` (``floor``, DynamicViT / Evo-ViT) or
    ``ceil(base * rate)`` (EViT), computed in float64 as the authors' Python does."""
    value = base.double() * rate
    return (torch.floor(value) if mode == "floor" else torch.ceil(value)).to(torch.int64)


def host_keep_count(base: list[int], rate: float, mode: str) -> list[int]:
    """``keep_count`` on host numbers (the same float64 arithmetic), so no device read is needed."""
    return [int(math.floor(n * rate) if mode == "floor" else math.ceil(n * rate)) for n in base]


def class_row_flops(config: ViTConfig, options: object, kept: Tensor, total: Tensor) -> Tensor:
    """The class token's attention row in each selection block: ``2 n C`` (EViT, ATS)."""
    return (2 * kept.double()[:, list(config.gate_blocks)] * config.embed_dim).sum(1)
