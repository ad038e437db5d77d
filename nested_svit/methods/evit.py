"""EViT (Liang et al. 2022; youweiliang/evit), inference.

Inside each pruning block (``gate_blocks``, DeiT-S: 3, 6, 9), after ``x + attn(norm1(x))`` and before
the MLP: the class token's attention row of that block, averaged over heads, scores the other active
tokens; the top ``ceil(keep_rate * (N - 1))`` stay (``N``: active tokens incl. the class token and
earlier fused tokens), the rest are dropped. With ``fuse_token`` their attention-weighted sum
(weights not renormalised) becomes one new token, held in a virtual row of the image (one per
stage), which later stages may keep or drop like any other. Only the MLP runs on the kept tokens.
Dropped tokens keep their post-attention value in the map (``preserve="attention"``) or their
value before the block (``"input"``); the release's weights are DeiT's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ViTConfig
from ..tokens import true_rows
from ..execution import AttentionRecord
from .base import Method
from .selection import SubsetRun, class_row_flops, host_keep_count, keep_count


@dataclass(frozen=True)
class EViTOptions:
    fuse_token: bool = False  # dropped tokens fused into one extra token per stage
    preserve: str = "attention"  # a dropped token keeps its post-attention value, or its "input" to the block


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
        cand = true_rows(~first, layout.total - layout.batch_size)  # positions in the record (host count)
        rows, cimage, score = record.rows[cand], image[cand], attn[cand]
        n = layout.offsets.diff()
        rate = self.config.keep_targets[s]
        k = keep_count(n - 1, rate, "ceil")
        k_host = host_keep_count([m - 1 for m in layout.lengths], rate, "ceil")  # fixed counts: no device read
        lengths = [min(kh, m - 1) + 1 + int(self.options.fuse_token) for kh, m in zip(k_host, layout.lengths)]
        keep = self.top_k(score, rows, cimage, k)
        keep[record.rows[layout.first_rows]] = True
        drop = true_rows(~keep[rows], sum(m - 1 - min(kh, m - 1) for kh, m in zip(k_host, layout.lengths)))
        dropped = rows[drop]
        if self.options.fuse_token:
            weights = score[drop].to(y.dtype)
            fused = y.new_zeros(layout.batch_size, y.shape[-1]).index_add_(
                0, cimage[drop], weights[:, None] * y[dropped])
            slot = bp.slot_rows[:, s]
            y[slot] = fused
            keep[slot] = True
        if self.options.preserve == "input":  # the dropped rows get their value from before the block back
            y[dropped] = before[cand[drop]]
        return self.chose(keep, self.rows_mask(rows), lengths)


def _validate(config: ViTConfig, options: EViTOptions) -> None:
    if options.preserve not in ("attention", "input"):
        raise ValueError(f"EViT's preserve must be 'attention' or 'input', not {options.preserve!r}")


def fused_rows(config: ViTConfig, options: EViTOptions) -> int:
    """One virtual row per stage for the fused token."""
    return len(config.gate_blocks) if options.fuse_token else 0


METHOD = Method(
    name="evit", title="EViT", run=EViTRun, options=EViTOptions, selector_flops=class_row_flops,
    virtual_rows=fused_rows, validate=_validate, legacy_names={"evit_preserve": "preserve"},
)
