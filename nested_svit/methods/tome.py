"""ToMe, token merging (Bolya et al. 2023; facebookresearch/ToMe ``bipartite_soft_matching``,
``merge_wavg``, proportional attention), inference, off-the-shelf or on ToMe-trained DeiT weights.

In every merging block (``gate_blocks``: all), after ``x + attn(norm1(x))`` and before the MLP, the
image's tokens in their current sequence order are split into A (even positions) and B (odd); keys
averaged over heads, L2-normalised, score every A-B pair by cosine; the class token (A's first) is
never merged. Each A token's best B partner is its edge; the ``r`` A tokens with the best edges
(``r <= (N - 1) // 2``) are merged into their partners by a size-weighted mean, and the sequence
becomes [unmerged A in order, B in order]. Sizes add up; attention adds ``log size`` to every key's
logit (``attention.KeyBiasContext``). On the packed map a merged token's row drops out and its
partner's row holds the mean; ``order`` tracks the sequence positions the split needs.

The algorithm is two plain tensor functions (``bipartite_soft_matching``, ``merge_wavg``, as ToMe's
``merge.py``), tested alone; ``ToMeRun.after_attention`` maps the packed map onto them and back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ViTConfig
from ..tokens import pad, true_rows
from ..execution import AttentionRecord
from .base import Method
from .selection import SubsetRun


def bipartite_soft_matching(metric: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """ToMe's bipartite soft matching on padded sequences, all images at once. ``metric [B, N, d]``:
    L2-normalised keys in sequence order; ``valid [B, N]``: False at padding. A = even positions, B =
    odd; the class token (A's first) is never matched. -> (``edge [B, nA]``: A positions by the cosine
    of their best B partner, best first (stable; padding last), ``partner [B, nA]``: each A position's
    best B position). ToMe merges the first ``r`` of ``edge`` into their partners."""
    a, b = metric[:, 0::2], metric[:, 1::2]
    scores = a @ b.transpose(1, 2)  # [B, nA, nB]
    scores = scores.masked_fill(~valid[:, 1::2][:, None, :], float("-inf"))
    scores[:, 0, :] = float("-inf")  # the class token
    node_max, partner = scores.max(-1)
    node_max = node_max.masked_fill(~valid[:, 0::2], float("-inf"))
    return torch.argsort(node_max, dim=-1, descending=True, stable=True), partner


def merge_wavg(x: Tensor, size: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """ToMe's ``merge_wavg`` on rows: each row ``src[j]`` merged into row ``dst[j]`` by the size-weighted
    mean ``sum(size * x) / sum(size)``, written into ``x [T, C]`` at ``dst`` (in place). -> the sizes
    ``[T]`` after the merge (``dst`` rows hold the sums; ``src`` rows are dropped by the caller)."""
    weighted = x * size[:, None].to(x.dtype)
    total = weighted.index_add(0, dst, weighted[src])
    merged = size.index_add(0, dst, size[src])
    x[dst] = total[dst] / merged[dst, None].to(x.dtype)
    return merged


@dataclass(frozen=True)
class ToMeOptions:
    r: int = 0  # tokens merged per block


class ToMeRun(SubsetRun):
    def __init__(self, block_pass) -> None:
        super().__init__(block_pass)
        layout = block_pass.layout
        device = block_pass.protect.device
        self.size = torch.ones(layout.total, dtype=torch.float32, device=device)
        self.order = torch.arange(layout.total, device=device) - layout.offsets[layout.image_index]

    def has_mid_selection(self, i: int) -> bool:
        return i in self.stage_of_block

    def key_bias(self, i: int) -> Tensor | None:
        return self.size.log()

    def after_attention(self, i: int, y: Tensor, record: AttentionRecord, before: Tensor) -> Tensor | None:
        layout = record.layout
        n = layout.offsets.diff()
        r = torch.clamp((n - 1) // 2, max=self.options.r)  # ToMe protects the class token
        lengths = [m - min((m - 1) // 2, self.options.r) for m in layout.lengths]  # known on the host
        # rows in sequence order per image, then as padded [B, N] positions
        image = layout.image_index
        seq = record.rows[torch.argsort(image * (layout.max_len + 1) + self.order[record.rows])]
        packed_seq = layout  # the same rows per image, in sequence order
        c = record.qkv.shape[-1] // 3
        heads = record.num_heads
        keys = record.qkv[:, c:2 * c].float().view(-1, heads, c // heads).mean(1)
        row_of = torch.full((y.shape[0],), -1, dtype=torch.int64, device=y.device)
        row_of[record.rows] = torch.arange(record.rows.numel(), device=y.device)
        metric = keys[row_of[seq]]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        rows = pad(seq[:, None], packed_seq, -1)[..., 0]  # [B, N] map rows (-1: padding)
        rows_a, rows_b = rows[:, 0::2], rows[:, 1::2]
        edge, node_idx = bipartite_soft_matching(pad(metric, packed_seq), rows >= 0)
        merged = torch.arange(edge.shape[1], device=y.device)[None, :] < r[:, None]  # first r edges
        r_host = [min((m - 1) // 2, self.options.r) for m in layout.lengths]
        flat = true_rows(merged, sum(r_host))
        src_a = edge.reshape(-1)[flat]
        img = flat // edge.shape[1]
        src_rows = rows_a[img, src_a]
        dst_rows = rows_b[img, node_idx[img, src_a]]
        self.size = merge_wavg(y, self.size, src_rows, dst_rows)
        keep = self.active.clone()
        keep[src_rows] = False
        # new sequence: unmerged A in A order, then all of B in B order
        is_src = torch.zeros_like(rows_a, dtype=torch.bool)
        is_src[img, src_a] = True
        unm = (rows_a >= 0) & ~is_src
        rank_a = torch.cumsum(unm.long(), 1) - 1
        at = true_rows(unm, sum((m + 1) // 2 - r for m, r in zip(layout.lengths, r_host)))  # host counts
        self.order[rows_a.reshape(-1)[at]] = rank_a.reshape(-1)[at]
        n_unm = unm.sum(1, keepdim=True)
        at = true_rows(rows_b >= 0, sum(m // 2 for m in layout.lengths))
        new_b = (n_unm + torch.arange(rows_b.shape[1], device=y.device)[None, :]).expand_as(rows_b)
        self.order[rows_b.reshape(-1)[at]] = new_b.reshape(-1)[at]
        candidates = self.rows_mask(record.rows) & ~self.block_pass.protect
        return self.chose(keep, candidates, lengths)


def matching_flops(config: ViTConfig, options, kept: Tensor, total: Tensor) -> Tensor:
    """Bipartite matching in every merging block: ``2 (n/2)^2 d`` (``d`` the head dim)."""
    d = config.embed_dim // config.num_heads
    return (2 * (kept.double()[:, list(config.gate_blocks)] / 2) ** 2 * d).sum(1)


def _validate(config: ViTConfig, options: ToMeOptions) -> None:
    if options.r < 0:
        raise ValueError(f"ToMe's r (tokens merged per block) must be >= 0, got {options.r}")


METHOD = Method(
    name="tome", title="ToMe", run=ToMeRun, options=ToMeOptions, selector_flops=matching_flops, validate=_validate,
    legacy_names={"tome_r": "r"},
)
