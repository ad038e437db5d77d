"""EViT (Liang et al. 2022; youweiliang/evit), inference.

Inside each pruning block (``gate_blocks``, DeiT-S: 3, 6, 9), after ``x + attn(norm1(x))`` and before
the MLP: the class token's attention row of that block, averaged over heads, scores the other active
tokens; the top ``ceil(keep_rate * (N - 1))`` stay (``N``: active tokens incl. the class token and
earlier fused tokens), the rest are dropped. With ``fuse_token`` their attention-weighted sum
(weights not renormalised) becomes one new token, held in a virtual row of the image (one per
stage), which later stages may keep or drop like any other. Only the MLP runs on the kept tokens.
Dropped tokens keep their post-attention value in the map (``evit_preserve="attention"``) or their
value before the block (``"input"``); the release's weights are DeiT's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import AttentionRecord
from .selection import SubsetRun, keep_count


class EViTRun(SubsetRun):
    def has_mid_selection(self, i: int) -> bool:
        return i in self.stage_of_block

    def after_attention(self, i: int, y: Tensor, record: AttentionRecord, before: Tensor) -> Tensor | None:
        s = self.stage_of_block[i]
        bp, layout = self.block_pass, record.layout
        attn = record.class_probs().mean(-1)  # [Ta]
        image = layout.image_index
        first = torch.zeros_like(image, dtype=torch.bool)
        first[layout.first_rows] = True
        cand = ~first
        rows, cimage, score = record.rows[cand], image[cand], attn[cand]
        n = torch.tensor(layout.lengths, dtype=torch.int64, device=rows.device)
        k = keep_count(n - 1, self.config.keep_targets[s], "ceil")
        keep = self.top_k(score, rows, cimage, k)
        keep[record.rows[first]] = True
        dropped = rows[~keep[rows]]
        if self.config.fuse_token:
            weights = score[~keep[rows]].to(y.dtype)
            fused = y.new_zeros(layout.batch_size, y.shape[-1]).index_add_(
                0, cimage[~keep[rows]], weights[:, None] * y[dropped])
            slot = bp.slot_rows[:, s]
            y[slot] = fused
            keep[slot] = True
        if self.config.evit_preserve == "input":
            lost = ~keep[record.rows]
            y[record.rows[lost]] = before[lost]
        return self.chose(keep, self.rows_mask(rows))
