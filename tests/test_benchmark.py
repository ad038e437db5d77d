"""FLOP model against hand-computed values; gate calibration hits its targets; harness output."""
from __future__ import annotations

import pytest
import torch

from nested_svit import ViTConfig, create_model
from nested_svit.benchmark import BenchConfig, flops_per_image, run_benchmark
from nested_svit.benchmark.harness import COLUMNS


def test_flops_hand_computed():
    # C=8, 2 blocks, patch 4 on 8x8 -> 4 patches + cls = 5 tokens, 3 classes, one gate before block 1
    cfg = ViTConfig(embed_dim=8, num_heads=2, depth=2, patch_size=4, img_size=8, num_classes=3,
                    gate_blocks=(1,), keep_targets=(0.5,))
    kept = torch.tensor([[5, 3], [5, 1]])
    total = torch.tensor([5, 5])
    # block linears 24*n*C^2, attention 4*n^2*C, gate 2*N*(C*C/4 + C/4*2), embed 2*4*(3*16)*8, head 2*8*3
    image0 = (24 * 5 * 64 + 24 * 3 * 64) + (4 * 25 * 8 + 4 * 9 * 8) + 2 * 5 * (8 * 2 + 2 * 2) + 3072 + 48
    image1 = (24 * 5 * 64 + 24 * 1 * 64) + (4 * 25 * 8 + 4 * 1 * 8) + 200 + 3072 + 48
    assert flops_per_image(cfg, kept, total).tolist() == [image0, image1] == [16696, 13368]


def test_deit_small_flops_match_published():
    """DeiT-S is 4.6 GMACs (paper Table 6): 2 FLOPs per MAC."""
    cfg = create_model("deit_small_patch16_224").config
    total = torch.tensor([197])
    gflops = float(flops_per_image(cfg, total[:, None].expand(-1, 12), total)) / 1e9
    assert 4.55 <= gflops / 2 <= 4.65


@pytest.mark.parametrize("targets", [None, [0.9, 0.2, 0.5, 0.05, 1.0, 0.33, 0.6, 0.4, 0.1]])
def test_calibration_hits_targets(targets):
    torch.manual_seed(0)
    model = create_model("svit_tiny").eval()
    images = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    reached = model.calibrate_keep(images, targets)
    targets = targets or list(model.config.keep_targets)
    with torch.no_grad():
        _, usage = model.forward_features(images, return_usage=True)
    n = 197
    for k, block in enumerate(model.config.gate_blocks):
        kept = usage.kept[:, block].double()
        # gates 0-7 always keep the class token and decide over the 196 patches; the last decides over all
        fraction = float((kept - 1).mean() / (n - 1)) if k < 8 else float(kept.mean() / n)
        assert abs(fraction - targets[k]) <= 0.02, (k, fraction, targets[k])
        assert abs(reached[k] - fraction) < 1e-6
    per_image = usage.kept[:, 3:].unique(dim=0)
    assert per_image.shape[0] > 1, "calibration must not force equal counts per image"


def test_harness_columns_and_consistency():
    cfg = BenchConfig(models=["svit_tiny"], batch_sizes=[1, 2], rounds=2, min_time=0.0, warmup=1, img_size=64,
                      backends=["auto", "padded"])
    df = run_benchmark(cfg)
    assert list(df.columns) == COLUMNS
    assert set(df["model"]) == {"deit_tiny_patch16_224", "svit_tiny"}  # dense counterpart added
    assert len(df) == 2 * 3
    dense = df[df.model == "deit_tiny_patch16_224"]
    assert (dense.speedup == 1.0).all() and (dense.ideal_speedup == 1.0).all()
    svit = df[df.model == "svit_tiny"]
    assert (svit.ideal_speedup > 1).all() and (svit.mean_kept_tokens < 17).all()
    assert svit.calibrated_gates.iloc[0] == ",".join(map(str, range(9)))
    row = svit.iloc[0]
    assert row.infer_samples_per_sec == pytest.approx(row.batch_size / (row.infer_step_time / 1000))
    assert row.efficiency == pytest.approx(row.speedup / row.ideal_speedup)
