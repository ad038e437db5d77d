"""Evo-ViT (Xu et al. 2022; YifanXu74/Evo-ViT ``evo_deit``), inference.

A running score per patch token follows the class token's attention (summed over heads) of every
block: replaced by it before the first selection block, then ``s <- (1 - t) s + t a`` for the tokens
a block processed (``t = evo_tradeoff``, 0.5). Before each selection block (``gate_blocks``, DeiT-S:
4 and 8) the top ``int(N0 * keep_targets[s])`` patch tokens by score (among all of them, so a token
may come back) plus the class token are active for the blocks up to the next selection; the others
keep their values (preserved). The classifier reads ``head(norm(mean of all patch tokens))``
(``readout="mean"``, the authors' model; ``"cls"``: the class token as DeiT).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ViTConfig
from ..tokens import Packed
from ..execution import AttentionRecord
from .base import Method
from .selection import SubsetRun, host_keep_count, keep_count


@dataclass(frozen=True)
class EvoViTOptions:
    tradeoff: float = 0.5  # score <- (1 - t) score + t attention after the first selection
    readout: str = "cls"  # classifier head input: "cls" token, or "mean" of patch tokens then norm (the release)


class EvoViTRun(SubsetRun):
    def __init__(self, block_pass) -> None:
        super().__init__(block_pass)
        self.scores = torch.zeros(block_pass.layout.total, dtype=torch.float32, device=block_pass.protect.device)
        self.first_selection = min(self.config.gate_blocks, default=self.config.depth)

    def records(self, i: int) -> bool:
        return True

    def after_block(self, i: int, record: AttentionRecord | None) -> None:
        attn = record.class_probs().sum(-1)
        patch = ~self.block_pass.protect[record.rows]
        t = 1.0 if i < self.first_selection else self.options.tradeoff
        old = self.scores[record.rows]
        self.scores[record.rows] = torch.where(patch, (1 - t) * old + t * attn, old)  # patch tokens only

    def before_block(self, i: int, x: Packed) -> Tensor | None:
        s = self.stage_of_block.get(i)
        if s is None:
            return super().before_block(i, x)
        bp = self.block_pass
        candidates = ~bp.protect & ~bp.slot_mask
        rows = self.candidate_rows(candidates, sum(self.base_patches()))
        image = bp.layout.image_index[rows]
        k = keep_count(bp.patches, self.config.keep_targets[s], "floor")
        base = self.base_patches()
        lengths = [min(k, n) + self.cls for k, n in zip(host_keep_count(base, self.config.keep_targets[s], "floor"), base)]
        return self.chose(self.top_k(self.scores[rows], rows, image, k) | bp.protect, candidates, lengths)

    def readout_mask(self) -> Tensor | None:
        return None  # preserved tokens are part of the read-out (the mean)


def _validate(config: ViTConfig, options: EvoViTOptions) -> None:
    if options.readout not in ("cls", "mean"):
        raise ValueError(f"Evo-ViT's readout must be 'cls' or 'mean', not {options.readout!r}")


def running_score_flops(config: ViTConfig, options, kept: Tensor, total: Tensor) -> Tensor:
    """The class token's attention row in every block: ``2 n C``."""
    return (2 * kept.double() * config.embed_dim).sum(1)


METHOD = Method(
    name="evovit", title="Evo-ViT", run=EvoViTRun, options=EvoViTOptions, selector_flops=running_score_flops,
    readout=lambda options: options.readout, validate=_validate,
    legacy_names={"evo_tradeoff": "tradeoff"},
)
