"""MCTF, multi-criteria token fusion (Lee et al., CVPR 2024; mlvlab/MCTF ``utils/mctf.py``,
``models/modules/blocks.py``), inference with one-step-ahead attention, as its eval scripts set it.

At the **input** of each fusing block (``gate_blocks``; MCTF: 1-11 with ``r = 16``, MCTF-Fast: 3, 6, 9
with ``r = 0.35``): the block's attention probabilities over the image's current tokens are computed
(``softmax(q k^T / sqrt(d) + log size)`` from ``norm1(x)``). The tokens in their sequence order are
split into A (even positions, the class token first and never fused) and B (odd); each A-B pair is
scored by ``((cos + 1) / 2)^(1/tau_sim)`` of the block inputs, times ``(i_a i_b)^(1/tau_info)`` with
``i`` the inverse of the attention a token receives (mean over heads and queries, over its image's
max), times ``(s_a s_b)^(1/tau_size)`` with ``s`` the inverse size (over its max). With
``bidirection``, ``r // 2`` A tokens with the best scores go into their best B partner, then
``r - r // 2`` B tokens into their best unfused A partner; each group becomes the mean of its members
weighted by attention received times size (over the image's largest size), sizes add up, and the
block's attention probabilities are fused the same way (keys summed, queries weighted), so only the
values are recomputed from the fused tokens ("one-step-ahead"). The next sequence is [A tokens left,
ascending, then the B tokens left, by their score, best first]. Blocks that do not fuse add ``log
size`` to their keys. ``r`` per image: ``t - 10`` when ``t - r < 10`` (t: its tokens), a fraction
``< 1`` of its ``t - 1`` patch tokens, at most ``(t - 1) // 2``; nothing is fused when it is not
positive (the authors' code fails there). On the packed map a group's representative row (the A or
unfused B token it ends in) holds the fused token and the others drop out.

Ties in the score ranking keep the lower position first (the authors' sort is not stable); float32
near-ties decide the next split, so references compare on inputs whose order is stable. MCTF
fine-tunes with distillation; that training is not carried here (its released weights run).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ViTConfig
from ..tokens import Layout, pad, true_rows
from .base import Method
from .selection import SubsetRun


@dataclass(frozen=True)
class MCTFOptions:
    r: float = 16  # tokens fused per block, or (< 1) the fraction of the patch tokens
    tau_sim: float = 1.0  # exponent 1/tau of each criterion (0: the criterion is left out)
    tau_info: float = 20.0
    tau_size: float = 40.0
    bidirection: bool = True


def fused_count(t: int, r: float) -> int:
    """Tokens fused in a block whose image holds ``t`` tokens (class token included)."""
    if t - r < 10:
        r = t - 10
    return max(0, min(int((t - 1) * r) if r < 1 else int(r), (t - 1) // 2))


def fused_counts(t: Tensor, r: float) -> Tensor:
    """``fused_count`` of every image's ``t [B]`` on the device (nothing copied there, nothing read back)."""
    wanted = torch.where(t - r < 10, (t - 10).double(), torch.full_like(t, 0, dtype=torch.float64) + r)
    wanted = torch.where(wanted < 1, torch.floor((t - 1) * wanted), torch.floor(wanted)).long()
    return torch.minimum(wanted, (t - 1) // 2).clamp(min=0)


def _inverse_rank(order: Tensor) -> Tensor:
    """``order [B, n]`` (a permutation per row) -> each entry's rank in it."""
    rank = torch.empty_like(order)
    return rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))


class MCTFRun(SubsetRun):
    def __init__(self, block_pass) -> None:
        super().__init__(block_pass)
        layout = block_pass.layout
        device = block_pass.protect.device
        self.size = torch.ones(layout.total, dtype=torch.float32, device=device)
        self.log_size: Tensor | None = None
        self.order = torch.arange(layout.total, device=device) - layout.offsets[layout.image_index]
        self.probs: tuple[int, Tensor] | None = None  # (block, its fused attention probabilities)
        self.counts = layout.offsets.diff()  # [B] each image's tokens on the device (host: ``active_lengths``)

    def key_bias(self, i: int) -> Tensor | None:
        return None if self.probs is not None and self.probs[0] == i else self.log_size

    def attention_probs(self, i: int) -> Tensor | None:
        return self.probs[1] if self.probs is not None and self.probs[0] == i else None

    def before_block(self, i: int, x) -> Tensor | None:
        lengths = list(self.active_lengths)
        fused = [fused_count(t, self.options.r) for t in lengths] if i in self.stage_of_block else []
        if not any(fused):
            return super().before_block(i, x)
        layout = self.block_pass.layout
        rows = self.candidate_rows(self.active, sum(lengths))
        image = layout.image_index[rows]
        seq = rows[torch.argsort(image * (layout.max_len + 1) + self.order[rows])]  # sequence order per image
        f = fused_counts(self.counts, self.options.r)
        act = Layout.from_counts(self.counts, lengths)
        at = pad(seq[:, None], act, -1)[..., 0]  # [B, L] rows in sequence order (-1: padding)
        valid = at >= 0
        work = torch.promote_types(x.values.dtype, torch.float32)  # decisions in fp32 (or the model's fp64)
        values = pad(x.values[seq].to(work), act)  # [B, L, C] the block inputs
        sizes = torch.where(valid, pad(self.size[seq][:, None].to(work), act, 1.0)[..., 0], 0.0)
        attn = self._attention(i, x.values[seq], act, valid, sizes)  # [B, H, L, L]
        received = (attn * valid[:, None, :, None]).sum((1, 2)) / (attn.shape[1] * act.offsets.diff()[:, None])
        group, order = self._match(values, received, sizes, valid, f)
        self.counts = self.counts - f
        new_lengths = [t - k for t, k in zip(lengths, fused)]
        own = (group == torch.arange(at.shape[1], device=at.device)) & valid  # the groups' representatives
        own = true_rows(own.reshape(-1), sum(new_lengths))  # flat positions (host count: no device read)
        keep = torch.zeros_like(self.active)
        keep[at.reshape(-1)[own]] = True
        weight = received * sizes / sizes.amax(-1, keepdim=True)  # attention received x size (pooling 1)
        self._fuse(x, attn, values, sizes, weight, at, group, own, keep, new_lengths, i)
        self.order[at.reshape(-1)[own]] = order.reshape(-1)[own]
        return self.chose(keep, self.rows_mask(rows) & ~self.block_pass.protect, new_lengths)

    def _attention(self, i: int, values: Tensor, act: Layout, valid: Tensor, sizes: Tensor) -> Tensor:
        """Block ``i``'s attention probabilities ``[B, H, L, L]`` (``sizes``' dtype) over the tokens in sequence
        order (``values``: packed in that order), with ``log size`` on the keys once sizes exist."""
        block = self.block_pass.stack.blocks[i]
        qkv = pad(block.qkv_of(values).to(sizes.dtype), act)  # [B, L, 3C]
        b, n, c3 = qkv.shape
        q, k = (t.reshape(b, n, block.attn.num_heads, -1).transpose(1, 2) for t in qkv[..., :2 * c3 // 3].chunk(2, -1))
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        bias = torch.where(valid, sizes.log() if self.log_size is not None else 0.0, float("-inf"))
        return torch.softmax(logits + bias[:, None, None, :], -1)

    def _match(self, values: Tensor, received: Tensor, sizes: Tensor, valid: Tensor, f: Tensor
               ) -> tuple[Tensor, Tensor]:
        """The two-way bipartite matching of the multi-criteria scores, ``f [B]`` tokens fused per image.
        -> (``[B, L]`` the position of each token's group's representative (padding: its own), ``[B, L]``
        each position's place in the next sequence (representatives only))."""
        opts = self.options
        device = values.device
        r1 = f // 2 if opts.bidirection else f
        metric = values / values.norm(dim=-1, keepdim=True)
        a, b = metric[:, 0::2], metric[:, 1::2]
        scores = a @ b.transpose(1, 2)  # [B, nA, nB] cosine
        scores = ((scores + 1) / 2) ** (1 / opts.tau_sim) if opts.tau_sim else torch.ones_like(scores)
        for per_token, tau in ((received, opts.tau_info), (sizes, opts.tau_size)):
            if tau:  # the inverse (of attention received, of size) over the image's largest
                inverse = torch.where(valid, 1 / per_token, 0.0)
                inverse = inverse / inverse.amax(-1, keepdim=True)
                scores = scores * (inverse[:, 0::2, None] * inverse[:, None, 1::2]) ** (1 / tau)
        valid_a, valid_b = valid[:, 0::2], valid[:, 1::2]
        scores = scores.masked_fill(~(valid_a[:, :, None] & valid_b[:, None, :]), float("-inf"))
        scores[:, 0, :] = float("-inf")  # the class token is never fused
        node_max, node_idx = scores.max(-1)  # [B, nA]
        src_a = _inverse_rank(torch.argsort(node_max, dim=-1, descending=True, stable=True)) < r1[:, None]
        n_b = b.shape[1]
        rep_b = (2 * torch.arange(n_b, device=device) + 1).expand(b.shape[0], -1)  # B positions
        if opts.bidirection:
            second = scores.masked_fill(src_a[:, :, None], float("-inf")).transpose(1, 2)  # [B, nB, nA]
            node_max2, node_idx2 = second.max(-1)
            rank_b = _inverse_rank(torch.argsort(node_max2, dim=-1, descending=True, stable=True))
            rep_b = torch.where(rank_b < (f - r1)[:, None], 2 * node_idx2, rep_b)
        else:  # B keeps its order
            rank_b = torch.arange(n_b, device=device).expand(b.shape[0], -1)
        rep_a = torch.where(src_a, rep_b.gather(1, node_idx), 2 * torch.arange(a.shape[1], device=device)[None, :])
        group = torch.empty_like(valid, dtype=torch.int64)
        group[:, 0::2], group[:, 1::2] = rep_a, rep_b
        group = torch.where(valid, group, torch.arange(valid.shape[1], device=device)[None, :])
        unfused_a = valid_a & ~src_a
        order = torch.zeros_like(group)
        order[:, 0::2] = torch.cumsum(unfused_a.long(), 1) - 1
        order[:, 1::2] = unfused_a.sum(1, keepdim=True) + rank_b - (f - r1)[:, None] * int(opts.bidirection)
        return group, order

    def _fuse(self, x, attn: Tensor, values: Tensor, sizes: Tensor, weight: Tensor, at: Tensor, group: Tensor,
              own: Tensor, keep: Tensor, new_lengths: list[int], i: int) -> None:
        """Each group's weighted mean into its representative's row (``own``: their flat positions in
        ``at``), sizes summed, and the attention probabilities fused (keys summed, queries weighted) in
        the kept rows' map order (the order the block's packed rows come in)."""
        b, n = group.shape
        flat = (group + n * torch.arange(b, device=group.device)[:, None]).reshape(-1)
        w = weight.reshape(-1)
        num = values.new_zeros(b * n, values.shape[-1]).index_add_(0, flat, (w[:, None] * values.reshape(b * n, -1)))
        den = w.new_zeros(b * n).index_add_(0, flat, w)
        total = w.new_zeros(b * n).index_add_(0, flat, sizes.reshape(-1))
        rep_rows = at.reshape(-1)[own]
        x.values[rep_rows] = (num[own] / den[own, None]).to(x.values.dtype)
        self.size[rep_rows] = total[own].to(self.size.dtype)
        self.log_size = self.size.log()
        # the kept rows' place in map order within their image: the given attention's row order
        kept = true_rows(keep, sum(new_lengths))
        new = Layout.from_counts(self.counts, new_lengths)
        place = torch.full_like(self.order, -1)
        place[kept] = torch.arange(kept.numel(), device=kept.device) - new.offsets[new.image_index]
        width = max(new_lengths)
        target = torch.where(at >= 0, place[at.gather(1, group).clamp(min=0)], width)  # [B, L]
        heads = attn.shape[1]
        keys = attn.new_zeros(b, heads, n, width + 1).scatter_add_(
            3, target[:, None, None, :].expand(-1, heads, n, -1), attn)
        queries = keys.new_zeros(b, heads, width + 1, width + 1).scatter_add_(
            2, target[:, None, :, None].expand(-1, heads, -1, width + 1), keys * weight[:, None, :, None])
        norm = weight.new_zeros(b, width + 1).scatter_add_(1, target, weight)
        self.probs = (i, (queries / norm[:, None, :, None].clamp(min=1e-30))[:, :, :width, :width])


def merge_flops(config: ViTConfig, options: MCTFOptions, kept: Tensor, total: Tensor) -> Tensor:
    """Each fusing block's look-ahead on its ``t`` incoming tokens: ``q``, ``k`` (``4 t C^2``), their
    logits (``2 t^2 C``), the A-B similarity (``2 (t/2)^2 C``); the block itself is counted on the
    fused tokens. ``t``: the tokens of the block before (all of them before block 0)."""
    c = config.embed_dim
    incoming = torch.cat([total.double()[:, None], kept.double()[:, :-1]], 1)
    t = incoming[:, list(config.gate_blocks)]
    return (4 * t * c * c + 2 * t * t * c + 2 * (t / 2) ** 2 * c).sum(1)


def _validate(config: ViTConfig, options: MCTFOptions) -> None:
    if options.r <= 0:
        raise ValueError(f"MCTF's r (tokens fused per block, or a fraction < 1) must be > 0, got {options.r}")
    if min(options.tau_sim, options.tau_info, options.tau_size) < 0:
        raise ValueError("MCTF's tau_sim, tau_info and tau_size must be >= 0 (0: the criterion left out)")


METHOD = Method(
    name="mctf", title="MCTF", run=MCTFRun, options=MCTFOptions, selector_flops=merge_flops, validate=_validate,
    train_execution=None,
    train_refusal="MCTF fine-tunes with its own distillation and token-reduction consistency, which this "
                  "engine's trainer does not carry; its released weights run for inference",
)
