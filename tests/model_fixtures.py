"""Small classifiers whose class token and gates matter, for the device tests (simulated and real CUDA)."""
from __future__ import annotations

import re

import torch

from nested_svit import create_model

SMALL = dict(embed_dim=128, num_heads=2, num_classes=10, img_size=64)  # head dim 64, as DeiT-S


def lively_model(name: str, seed: int = 0):
    """``name`` at ``SMALL`` size, eval mode, with a position embedding and class token large enough that
    tokens differ (as tests/test_baselines.py), and SViT-style gates calibrated to their keep targets."""
    torch.manual_seed(seed)
    model = create_model(name, **SMALL).eval()
    with torch.no_grad():
        model.pos_embed.normal_(std=0.5)
        if model.cls_token is not None:
            model.cls_token.normal_(std=0.5)
    if model.method.calibrate is not None:
        model.calibrate_keep(torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(9)))
    return model


def method_models(width: str = "small") -> list[str]:
    """Every registered 224-px classifier of this width: one per pruning method and option variant, and
    the dense one (not a method's other operating points). From the registry, so a new method runs in every test that loops over methods."""
    from nested_svit import list_models
    from nested_svit.registry import WIDTHS, get_config

    dim = WIDTHS[width][0]
    return [n for n in list_models() if get_config(n).embed_dim == dim and get_config(n).img_size == 224
            and not re.search(r"_\d+\.\d+$", n)]  # DiffRate's other targets (diffrate_small_2.5): the same code


def one_per_method_fast(names: list[str]) -> list:
    """``names`` as pytest parameters: the first model of each method (and dense) in the fast tier, the
    method's other option variants (ATC's linkages, EViT without fusion, MCTF-Fast) in the slow one, as
    they run the same code with other options."""
    import pytest

    from nested_svit.registry import get_config

    seen: set = set()
    params = []
    for name in names:
        method = get_config(name).method
        params.append(name if method not in seen else pytest.param(name, marks=pytest.mark.slow))
        seen.add(method)
    return params
