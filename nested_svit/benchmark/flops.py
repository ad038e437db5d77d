"""FLOP model of a (pruned) ViT forward, counted from the tokens each block actually processed.

Per block with ``n`` tokens into attention, ``q`` of them needing an attention output and ``m`` into
the MLP: qkv ``6 n C^2``, attention ``4 q n C`` (QK^T and AV rows), proj ``2 q C^2``, MLP ``16 m C^2``
(2 FLOPs per MAC, mlp_ratio 4). ``q = n`` except for ATS, whose selection precedes the attention, so
only the kept queries' rows are computed (``q = m``).
Selectors: SViT gate over all ``N`` tokens ``2 N (C C/4 + C/4 2)``; DynamicViT predictor over the
active patch tokens ``2 n (C^2 + C C/2 + C/2 C/4 + C/4 2)``; class-attention row (EViT, Evo-ViT, ATS)
``2 n C`` per block that reads it; ToMe matching ``2 (n/2)^2 d`` per block (``d`` the head dim); each
in its method's file.
Patch embedding ``2 P (3 p^2) C``, head ``2 C K``. LayerNorm, GELU, softmax, sorting and
gather/scatter are not counted (as usual for ViT FLOP tables).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..config import ViTConfig
from ..methods import get_method


def flops_per_image(config: ViTConfig, kept: Tensor, total: Tensor, kept_mlp: Tensor | None = None) -> Tensor:
    """``kept [B, depth]`` tokens into each block's attention, ``kept_mlp`` into its MLP (default:
    ``kept``), ``total [B]`` tokens per image -> ``[B]`` float64 FLOPs. The selectors' cost is the
    method's own (``Method.selector_flops``)."""
    method = get_method(config.method)
    options = method.resolve_options(config)
    c = config.embed_dim
    n = kept.double()
    m = n if kept_mlp is None else kept_mlp.double()
    q = m if method.query_subset else n
    hidden = config.mlp_ratio * c
    linears = (2 * n * 3 * c * c + 2 * q * c * c + 2 * m * (2 * c * hidden)).sum(1)
    attention = (4 * q * n * c).sum(1)
    total = total.double()
    selectors = method.selector_flops(config, options, kept, total)
    embed = 2 * (total - 1) * (config.in_chans * config.patch_size ** 2) * c
    head = 2 * c * config.num_classes
    return linears + attention + selectors + embed + head + torch.zeros_like(total)
