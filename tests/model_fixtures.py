"""Small classifiers whose class token and gates matter, for the device tests (simulated and real CUDA)."""
from __future__ import annotations

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
