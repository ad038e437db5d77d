"""ATS, adaptive token sampling (Fayyaz et al. 2022; adaptivetokensampling/ATS ``AdaptiveTokenSampler``),
inference, with off-the-shelf DeiT weights.

Inside each sampling block (``gate_blocks``, DeiT-S: 3..11), between attention and MLP: scores
``s_j = (sum over heads of the class token's attention to j) * ||v_j||`` over the image's other active
tokens, normalised to sum 1 and sorted ascending; their cumulative sum, rescaled to [0, 1], is
inverted at ``K = N0`` (the image's initial patch count) evenly spaced points from its smallest
positive value to 1: each point keeps the token whose rescaled cumulative score is nearest (the
first on ties). Distinct picks plus the class token stay; the rest are dropped. So each image keeps
its own number of tokens. The nearest-point search is ``searchsorted`` over the sorted values
(O(N log N)), not the release's ``[K, N]`` distance matrix. The selection reads only the block's
``qkv`` (class-token attention row and value norms), so attention, projection and MLP then run for
the selected rows only, against every active key (``MethodRun.select_queries``); dropped tokens keep
their value from before the block.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..tokens import Layout, pad, padding_mask, true_rows, unpad
from ..execution import AttentionRecord
from .base import Method
from .selection import SubsetRun, class_row_flops


def inverse_transform_picks(sorted_cdf: Tensor, valid: Tensor, samples: Tensor, kmax: int | None = None) -> Tensor:
    """``sorted_cdf [B, N]`` rescaled cumulative scores (ascending; invalid pads at the end set above
    1), ``valid [B, N]``, ``samples [B]`` number of points ``K`` (``kmax``: their maximum, when the
    caller knows it on the host) -> ``[B, N]`` bool: positions picked by the nearest (first on ties) of
    the ``K`` points ``y0 + k (1 - y0) / (K - 1)``."""
    b, n = sorted_cdf.shape
    positive = torch.where(valid & (sorted_cdf > 0), sorted_cdf, torch.full_like(sorted_cdf, float("inf")))
    y0 = positive.min(1).values.clamp_max(1.0)  # [B]
    if kmax is None:
        kmax = int(samples.max()) if samples.numel() else 0
    k = torch.arange(kmax, device=sorted_cdf.device, dtype=sorted_cdf.dtype)
    steps = (samples - 1).clamp_min(1).to(sorted_cdf.dtype)
    y = y0[:, None] + k[None, :] * ((1 - y0) / steps)[:, None]  # [B, K]
    y_valid = k[None, :] < samples[:, None]
    right = torch.searchsorted(sorted_cdf.contiguous(), y.contiguous(), side="left").clamp_max(n - 1)
    left = (right - 1).clamp_min(0)
    left_value = sorted_cdf.gather(1, left)
    # argmin's "first index" rule: the left neighbour stands for the first position of its run of equal values
    left = torch.searchsorted(sorted_cdf.contiguous(), left_value.contiguous(), side="left")
    left_d = (y - sorted_cdf.gather(1, left)).abs()
    right_d = (sorted_cdf.gather(1, right) - y).abs()
    pick = torch.where(left_d <= right_d, left, right)
    picked = torch.zeros(b, n + 1, dtype=torch.bool, device=sorted_cdf.device)  # column n: unused points
    picked.scatter_(1, torch.where(y_valid, pick, torch.full_like(pick, n)), True)
    return picked[:, :n] & valid


class ATSRun(SubsetRun):
    def selects_queries(self, i: int) -> bool:
        return i in self.stage_of_block

    def select_queries(self, i: int, record: AttentionRecord) -> Tensor:
        bp, layout = self.block_pass, record.layout
        first = torch.zeros(layout.total, dtype=torch.bool, device=record.rows.device)
        first[layout.first_rows] = True
        cand = true_rows(~first, layout.total - layout.batch_size)  # the image's other active tokens
        score = record.class_probs().sum(-1) * record.value_norms()  # [Ta] float32
        cand_layout = Layout.from_counts(layout.offsets.diff() - 1, [n - 1 for n in layout.lengths])
        valid = padding_mask(cand_layout)  # [B, Nmax]
        s = pad(score[cand][:, None], cand_layout)[..., 0]
        s = s / s.sum(1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
        s_sorted, order = torch.sort(torch.where(valid, s, torch.full_like(s, float("inf"))), dim=1, stable=True)
        valid_sorted = valid.gather(1, order)
        cdf = torch.cumsum(torch.where(valid_sorted, s_sorted, torch.zeros_like(s_sorted)), 1)
        lo = cdf[:, :1]
        hi = torch.where(valid_sorted, cdf, torch.full_like(cdf, float("-inf"))).max(1, keepdim=True).values
        span = hi - lo
        degenerate = ~(span > 0)  # one candidate, or nothing to tell apart: keep every candidate
        norm_cdf = (cdf - lo) / torch.where(degenerate, torch.ones_like(span), span)
        norm_cdf = torch.where(valid_sorted, norm_cdf, torch.full_like(norm_cdf, 2.0))
        picked_sorted = inverse_transform_picks(norm_cdf, valid_sorted, bp.patches.to(cdf.device),
                                                max(self.base_patches(), default=0))
        picked_sorted |= degenerate & valid_sorted
        picked = torch.zeros_like(picked_sorted).scatter_(1, order, picked_sorted)
        keep = torch.zeros_like(self.active)
        keep[record.rows[layout.first_rows]] = True
        keep[record.rows[cand]] = unpad(picked[..., None], cand_layout)[:, 0]  # integer rows: no device sync
        return self.chose(keep, self.rows_mask(record.rows[cand]))


METHOD = Method(
    name="ats", title="ATS", run=ATSRun, selector_flops=class_row_flops, query_subset=True,
    count_follows_attention=True, counts_on_device=True,
)
