"""Evo-ViT (Xu et al. 2022; YifanXu74/Evo-ViT ``evo_deit``), inference.

A running score per patch token follows the class token's attention (summed over heads) of every
block: replaced by it before the first selection block, then ``s <- (1 - t) s + t a`` for the tokens
a block processed (``t = evo_tradeoff``, 0.5). Before each selection block (``gate_blocks``, DeiT-S:
4 and 8) the top ``int(N0 * keep_targets[s])`` patch tokens by score (among all of them, so a token
may come back) plus the class token are active for the blocks up to the next selection; the others
keep their values (preserved). The classifier reads ``head(norm(mean of all patch tokens))``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..tokens import Packed
from .base import AttentionRecord
from .selection import SubsetRun, keep_count


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
        rows, a = record.rows[patch], attn[patch]
        t = 1.0 if i < self.first_selection else self.config.evo_tradeoff
        self.scores[rows] = (1 - t) * self.scores[rows] + t * a

    def before_block(self, i: int, x: Packed) -> Tensor | None:
        s = self.stage_of_block.get(i)
        if s is None:
            return self.active
        bp = self.block_pass
        candidates = ~bp.protect & ~bp.slot_mask
        rows = candidates.nonzero().squeeze(1)
        image = bp.layout.image_index[rows]
        k = keep_count(bp.patches, self.config.keep_targets[s], "floor")
        return self.chose(self.top_k(self.scores[rows], rows, image, k) | bp.protect, candidates)

    def readout_mask(self) -> Tensor | None:
        return None  # preserved tokens are part of the read-out (the mean)
