"""Shared pieces of the baselines' token selection on packed rows."""
from __future__ import annotations

import torch
from torch import Tensor

from ..config import ViTConfig
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
        self.everything = block_pass.stack.slots == 0  # no selection yet and no virtual rows: all rows active

    def chose(self, keep: Tensor, candidates: Tensor) -> Tensor:
        """Record a stage's selection (``[T]`` bool kept, ``[T]`` bool candidates); -> ``keep``."""
        self.masks.append(keep)
        self.decided.append(candidates)
        self.active = keep
        self.everything = False
        return keep

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
        rank = segment_rank(scores, image)
        keep[rows[rank < k[image]]] = True
        return keep


def keep_count(base: Tensor, rate: float, mode: str) -> Tensor:
    """Per-image kept counts: ``int(base * rate)`` (``floor``, DynamicViT / Evo-ViT) or
    ``ceil(base * rate)`` (EViT), computed in float64 as the authors' Python does."""
    value = base.double() * rate
    return (torch.floor(value) if mode == "floor" else torch.ceil(value)).to(torch.int64)


def class_row_flops(config: ViTConfig, options: object, kept: Tensor, total: Tensor) -> Tensor:
    """The class token's attention row in each selection block: ``2 n C`` (EViT, ATS)."""
    return (2 * kept.double()[:, list(config.gate_blocks)] * config.embed_dim).sum(1)
