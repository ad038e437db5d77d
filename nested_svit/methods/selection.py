"""Shared pieces of the baselines' token selection on packed rows."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import ViTConfig
from ..tokens import true_rows
from .base import MethodRun, segment_rank


class SubsetRun(MethodRun):
    """A method whose active set only shrinks (DynamicViT, EViT, ATS, ToMe) or is re-chosen (Evo-ViT):
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
