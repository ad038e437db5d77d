"""Benchmarks on random weights: what stands in for trained selectors, so pruned models prune as a
trained one would on average. Calibratable methods (SViT) get their thresholds shifted to their keep
targets (``Method.calibrate``); a method whose keep count follows trained attention
(``Method.count_follows_attention``: ATS keeps ~92% of a random DeiT's tokens, its class attention being
nearly uniform) gets its queries sharpened (``sharpen_queries``); the others keep fixed counts."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..config import Pruning
from .flops import flops_per_image

ATS_PAPER_FLOP_RATIO = 3.0 / 4.6  # DeiT-S: 3.0 GFLOPs (SViT Table 7) of dense 4.6


@torch.no_grad()
def sharpen_queries(model, images, target_ratio: float = ATS_PAPER_FLOP_RATIO) -> float:
    """Scale the queries of the method's blocks by one factor, found by bisection, until the FLOPs of
    ``images`` are ``target_ratio`` of dense (the paper's 3.0 of 4.6 GFLOPs for ATS). -> the factor."""
    c = model.config.embed_dim
    blocks = [model.blocks[i] for i in model.config.gate_blocks]
    original = [(b.attn.qkv.weight[:c].clone(), b.attn.qkv.bias[:c].clone()) for b in blocks]
    dense = dataclasses.replace(model.config, pruning=Pruning())

    def ratio(factor: float) -> float:
        for b, (w, bias) in zip(blocks, original):
            b.attn.qkv.weight[:c] = w * factor
            b.attn.qkv.bias[:c] = bias * factor
        usage = model.forward_usage(images)
        n = usage.total[:, None].expand(-1, model.config.depth)
        return float(flops_per_image(model.config, usage.kept, usage.total, usage.kept_mlp).mean()
                     / flops_per_image(dense, n, usage.total).mean())

    lo, hi = 1.0, 1.0
    while ratio(hi) > target_ratio and hi < 1024:
        lo, hi = hi, hi * 2
    for _ in range(12):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if ratio(mid) > target_ratio else (lo, mid)
    ratio(hi)
    return hi


def stand_in_selectors(stack, images: Tensor | list, target_ratio: float = ATS_PAPER_FLOP_RATIO,
                       keep_targets=None) -> list:
    """Make a random-weight ``stack``'s selection behave like a trained one's (module docstring);
    -> what was done, for the output's ``calibrated_gates`` column."""
    method = stack.method
    if method.calibrate is not None and stack.num_gates:
        stack.calibrate_keep(images, keep_targets)
        return list(range(stack.num_gates))
    if method.count_follows_attention:
        return [f"queries x{sharpen_queries(stack, images, target_ratio):.2f}"]
    return []
