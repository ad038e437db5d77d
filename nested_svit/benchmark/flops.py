"""FLOP model of a (pruned) ViT forward, counted from the tokens each block actually processed.

Per block with ``n`` active tokens: linears ``24 n C^2`` (qkv 6, proj 2, mlp 16; 2 FLOPs per MAC,
mlp_ratio 4) and attention ``4 n^2 C`` (QK^T and AV). Per gate over all ``N`` tokens of the map:
``2 N (C * C/4 + C/4 * 2)``. Patch embedding ``2 (N-1) (3 p^2) C``, head ``2 C K``.
LayerNorm, GELU, softmax and gather/scatter are not counted (as usual for ViT FLOP tables).
"""
from __future__ import annotations

from torch import Tensor

from ..config import ViTConfig


def flops_per_image(config: ViTConfig, kept: Tensor, total: Tensor) -> Tensor:
    """``kept [B, depth]`` tokens per block, ``total [B]`` tokens per image -> ``[B]`` float64 FLOPs."""
    c = config.embed_dim
    n = kept.double()
    hidden = config.mlp_ratio * c
    linears = (2 * n * (3 * c * c + c * c) + 2 * n * (2 * c * hidden)).sum(1)
    attention = (4 * n * n * c).sum(1)
    total = total.double()
    gates = len(config.gate_blocks) * 2 * total * (c * (c // 4) + (c // 4) * 2)
    embed = 2 * (total - 1) * (config.in_chans * config.patch_size ** 2) * c
    head = 2 * c * config.num_classes
    return linears + attention + gates + embed + head
