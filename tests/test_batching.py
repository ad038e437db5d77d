"""Batch inference with mixed keep counts at batch sizes 1-256; usage matches the masks."""
from __future__ import annotations

import pytest
import torch

from nested_svit import create_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("svit_tiny").eval()
    m.calibrate_keep(torch.randn(8, 3, 224, 224))  # random gates -> mixed per-image counts near targets
    return m


@pytest.mark.parametrize("batch", [1, 2, 3, 17, 64, pytest.param(256, marks=pytest.mark.slow)])
def test_batch_sizes_and_usage(model, batch):
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        feats, usage = model.forward_features(images, return_usage=True)
        logits = model.forward_head(feats)
    assert logits.shape == (batch, 1000) and torch.isfinite(logits).all()
    assert usage.kept.shape == (batch, 12) and usage.kept.dtype == torch.int64
    assert usage.kept[:, :3].eq(197).all()  # ungated blocks process everything
    for k, block in enumerate(model.config.gate_blocks):
        per_image = usage.masks[k].view(batch, 197).sum(1)  # independent count from the masks
        assert torch.equal(usage.kept[:, block], per_image)
        assert usage.kept[:, block].ge(1 if k < 8 else 0).all()
    if batch >= 17:
        assert usage.kept[:, 3:].unique(dim=0).shape[0] > 1, "keep counts should differ across images"
