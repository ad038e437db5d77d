"""ToMe, token merging (Bolya et al. 2023; facebookresearch/ToMe ``bipartite_soft_matching``,
``merge_wavg``, proportional attention), inference, off-the-shelf or on ToMe-trained DeiT weights.

In every merging block (``gate_blocks``: all), after ``x + attn(norm1(x))`` and before the MLP, the
image's tokens in their current sequence order are split into A (even positions) and B (odd); keys
averaged over heads, L2-normalised, score every A-B pair by cosine; the class token (A's first) is
never merged. Each A token's best B partner is its edge; the ``r`` A tokens with the best edges
(``r <= (N - 1) // 2``) are merged into their partners by a size-weighted mean, and the sequence
becomes [unmerged A in order, B in order]. Sizes add up; attention adds ``log size`` to every key's
logit (``attention.KeyBiasContext``). On the packed map a merged token's row drops out and its
partner's row holds the mean; ``order`` tracks the sequence positions the split needs. Without a class
token (ATC's detection backbone: ``of_current``, ``t - int(keep_target * t)`` merges in its blocks)
nothing is protected and the unmerged A tokens stay in edge order, as ToMe's code leaves them.

The algorithm is two plain tensor functions (``bipartite_soft_matching`` here and ``merge_wavg`` in
``selection.py``, shared with ATC, as ToMe's ``merge.py``), tested alone; ``ToMeRun.after_attention`` maps the
packed map onto them and back (``MergeRun`` keeps the sizes and the key bias).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ViTConfig
from ..tokens import pad, true_rows
from ..execution import AttentionRecord
from .base import Method
from .selection import MergeRun, host_keep_count, keep_count


def bipartite_soft_matching(metric: Tensor, valid: Tensor, class_token: bool = True) -> tuple[Tensor, Tensor]:
    """ToMe's bipartite soft matching on padded sequences, all images at once. ``metric [B, N, d]``:
    L2-normalised keys in sequence order; ``valid [B, N]``: False at padding. A = even positions, B =
    odd; the class token (A's first, when there is one) is never matched. -> (``edge [B, nA]``: A
    positions by the cosine of their best B partner, best first (stable; padding last), ``partner [B,
    nA]``: each A position's best B position). ToMe merges the first ``r`` of ``edge`` into their partners."""
    a, b = metric[:, 0::2], metric[:, 1::2]
    scores = a @ b.transpose(1, 2)  # [B, nA, nB]
    scores = scores.masked_fill(~valid[:, 1::2][:, None, :], float("-inf"))
    if class_token:
        scores[:, 0, :] = float("-inf")
    node_max, partner = scores.max(-1)
    node_max = node_max.masked_fill(~valid[:, 0::2], float("-inf"))
    return torch.argsort(node_max, dim=-1, descending=True, stable=True), partner


@dataclass(frozen=True)
class ToMeOptions:
    r: int = 0  # tokens merged per block
    of_current: bool = False  # merge t - int(keep_target * t) of an image's t tokens instead (ATC's detection code)


class ToMeRun(MergeRun):
    def __init__(self, block_pass) -> None:
        super().__init__(block_pass)
        layout = block_pass.layout
        self.log_size = torch.zeros_like(self.size)  # ToMe biases every block's keys, the first too
        self.order = torch.arange(layout.total, device=self.size.device) - layout.offsets[layout.image_index]

    def after_attention(self, i: int, y: Tensor, record: AttentionRecord, before: Tensor) -> Tensor | None:
        layout = record.layout
        cls = self.cls
        r_host = [min((m - cls) // 2, self._merges(i, m)) for m in layout.lengths]  # the class token protected
        n = layout.offsets.diff()  # the same on the device, with nothing copied there
        if self.options.of_current:
            target = self.config.keep_targets[self.stage_of_block[i]]
            r = torch.minimum((n - cls) // 2, n - keep_count(n, target, "floor"))
        else:
            r = torch.clamp((n - cls) // 2, max=self.options.r)
        lengths = [m - k for m, k in zip(layout.lengths, r_host)]  # known on the host
        # rows in sequence order per image, then as padded [B, N] positions
        image = layout.image_index
        seq = record.rows[torch.argsort(image * (layout.max_len + 1) + self.order[record.rows])]
        packed_seq = layout  # the same rows per image, in sequence order
        keys = record.mean_keys()
        row_of = torch.full((y.shape[0],), -1, dtype=torch.int64, device=y.device)
        row_of[record.rows] = torch.arange(record.rows.numel(), device=y.device)
        metric = keys[row_of[seq]]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        rows = pad(seq[:, None], packed_seq, -1)[..., 0]  # [B, N] map rows (-1: padding)
        rows_a, rows_b = rows[:, 0::2], rows[:, 1::2]
        edge, node_idx = bipartite_soft_matching(pad(metric, packed_seq), rows >= 0, bool(cls))
        merged = torch.arange(edge.shape[1], device=y.device)[None, :] < r[:, None]  # first r edges
        flat = true_rows(merged, sum(r_host))
        src_a = edge.reshape(-1)[flat]
        img = flat // edge.shape[1]
        src_rows = rows_a[img, src_a]
        dst_rows = rows_b[img, node_idx[img, src_a]]
        self.merge(y, src_rows, dst_rows)
        keep = self.active.clone()
        keep[src_rows] = False
        # new sequence: unmerged A in A order (without a class token: in edge order, as ToMe leaves it),
        # then all of B in B order
        is_src = torch.zeros_like(rows_a, dtype=torch.bool)
        is_src[img, src_a] = True
        unm = (rows_a >= 0) & ~is_src
        if cls:
            rank_a = torch.cumsum(unm.long(), 1) - 1
        else:
            places = torch.arange(edge.shape[1], device=y.device).expand_as(edge)
            rank_a = torch.empty_like(edge).scatter_(1, edge, places) - r[:, None]
        at = true_rows(unm, sum((m + 1) // 2 - r for m, r in zip(layout.lengths, r_host)))  # host counts
        self.order[rows_a.reshape(-1)[at]] = rank_a.reshape(-1)[at]
        n_unm = unm.sum(1, keepdim=True)
        at = true_rows(rows_b >= 0, sum(m // 2 for m in layout.lengths))
        new_b = (n_unm + torch.arange(rows_b.shape[1], device=y.device)[None, :]).expand_as(rows_b)
        self.order[rows_b.reshape(-1)[at]] = new_b.reshape(-1)[at]
        candidates = self.rows_mask(record.rows) & ~self.block_pass.protect
        return self.chose(keep, candidates, lengths)

    def _merges(self, i: int, tokens: int) -> int:
        """Tokens block ``i`` merges of an image's ``tokens`` (before the cap at half)."""
        if not self.options.of_current:
            return self.options.r
        return tokens - host_keep_count([tokens], self.config.keep_targets[self.stage_of_block[i]], "floor")[0]


def matching_flops(config: ViTConfig, options, kept: Tensor, total: Tensor) -> Tensor:
    """Bipartite matching in every merging block: ``2 (n/2)^2 d`` (``d`` the head dim)."""
    d = config.embed_dim // config.num_heads
    return (2 * (kept.double()[:, list(config.gate_blocks)] / 2) ** 2 * d).sum(1)


def _validate(config: ViTConfig, options: ToMeOptions) -> None:
    if options.r < 0:
        raise ValueError(f"ToMe's r (tokens merged per block) must be >= 0, got {options.r}")


METHOD = Method(
    name="tome", title="ToMe", run=ToMeRun, options=ToMeOptions, selector_flops=matching_flops, validate=_validate,
    legacy_names={"tome_r": "r"}, needs_class_token=False,
)
