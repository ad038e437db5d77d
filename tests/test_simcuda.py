"""The CUDA paths on a simulated CUDA device (tests/simcuda.py): every method and backend, fp32 and bf16,
mixed resolutions, detectors and a training step with save and resume run with no device mixing and no
kernel-contract violation, give the CPU's outputs, and stay within a budget of host syncs per forward
(a sync is a count, not a time, so it belongs in a test)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import simcuda
from model_fixtures import lively_model, method_models
from nested_svit import create_model

METHODS = method_models("small")  # every method of the registry, and dense
# host syncs per forward of a batch of 8: one per gated SViT block (9), none for fixed counts, one per
# ATS sampling block; the budgets are SViT <= 12, EViT <= 20, ATS / ToMe <= 40
BUDGET = {"svit_small": 12, "dynamicvit_small": 20, "evit_small": 20, "evit_nofuse_small": 20, "evovit_small": 20,
          "ats_small": 40, "tome_small": 40, "deit_small_patch16_224": 1,
          **{f"atc{v}_small": 1 for v in ("", "_single", "_complete")},  # ATC: fixed counts, no read per merge
          "diffrate_small": 1, "mctf_small": 1, "mctf_fast_small": 1}  # fixed counts


@pytest.fixture(scope="module")
def dev():
    return simcuda.device()


# SViT and dense in the fast tier; every other method in the slow one
FAST_METHODS = ("svit_small", "deit_small_patch16_224")


@pytest.mark.parametrize("name", [n if n in FAST_METHODS else pytest.param(n, marks=pytest.mark.slow) for n in METHODS])
def test_methods_on_the_device_equal_the_cpu_within_the_sync_budget(dev, name):
    model = lively_model(name)
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, usage = model(images), model.forward_features(images, return_usage=True)[1]
    model.to(dev)
    runs = [(torch.float32, b) for b in ("auto", "loop", "padded", "nested")] + \
        [(torch.bfloat16, b) for b in ("auto", "loop", "nested", "varlen")]
    for dtype, backend in runs:
        model.to(dtype).set_execution("packed", backend)
        x = images.to(dev).to(dtype)
        with torch.no_grad(), simcuda.recording() as rec:
            feats, got_usage = model.forward_features(x, return_usage=True)
            logits = model.forward_head(feats)
        assert rec.violations == [] and rec.mixing == []
        assert rec.total_syncs <= BUDGET[name], (name, dtype, dict(rec.sync_sites))
        got = simcuda.to_cpu(logits).float()
        if dtype == torch.float32:
            torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)
            assert torch.equal(got_usage.kept, usage.kept)  # the same tokens in every block
            fused = {k for k in rec.kernels if not k.startswith("sdpa")}
            assert fused <= {"efficient"} and (fused or backend != "nested" or name != "svit_small")
        else:  # bf16 may flip a few decisions; logits stay close
            assert (got - expected).abs().max() < 0.5
            assert "varlen/flash" in rec.kernels or not any(k.startswith("varlen") for k in rec.kernels)
    model.to(torch.float32)


def test_mixed_resolutions_and_varlen_kernels(dev):
    """A list of images of three sizes on the device == on the CPU; the varlen kernel the device picks
    follows torch's rule (cuDNN above 128 rows on an H200), and the flash-only switch keeps flash."""
    from nested_svit import attention

    model = lively_model("svit_small", seed=3)
    images = [torch.randn(3, 64, 64), torch.randn(3, 48, 80), torch.randn(3, 32, 32)]
    with torch.no_grad():
        expected = model(images)
    model.to(dev).to(torch.bfloat16)
    on_device = [simcuda.to_device(i).to(torch.bfloat16) for i in images]
    with torch.no_grad(), simcuda.recording() as rec:
        got = model(on_device)
    assert rec.violations == [] and rec.total_syncs <= 12
    assert (simcuda.to_cpu(got).float() - expected).abs().max() < 0.5
    big = create_model("svit_small", embed_dim=128, num_heads=2, num_classes=10, img_size=192).eval()
    big.to(dev).to(torch.bfloat16).gates_open = True  # 145 rows per image: above 128
    x = simcuda.to_device(torch.randn(2, 3, 192, 192)).to(torch.bfloat16)
    with torch.no_grad():
        with simcuda.recording() as auto:
            big([x[0], x[1, :, :96]])
        attention.set_varlen_kernel("flash")
        try:
            with simcuda.recording() as flash:
                big([x[0], x[1, :, :96]])
        finally:
            attention.set_varlen_kernel("auto")
    assert "varlen/cudnn" in auto.kernels and "flash" in flash.kernels and not any("cudnn" in k for k in flash.kernels)


def test_the_device_refuses_mixing_and_broken_contracts(dev):
    """The simulation itself: CUDA's errors where CUDA raises (so the tests above can fail)."""
    from torch.nn.attention.varlen import varlen_attn

    a = simcuda.to_device(torch.ones(3, 4))
    with pytest.raises(RuntimeError, match="same device"):
        a + torch.ones(3, 4)
    assert float(a.sum() + torch.tensor(1.0)) == 13  # 0-dim CPU tensors are allowed
    q = simcuda.to_device(torch.randn(6, 2, 8)).to(torch.bfloat16)
    cu = simcuda.to_device(torch.tensor([0, 2, 6], dtype=torch.int32))
    with pytest.raises(simcuda.ContractError, match="int32"):
        varlen_attn(q, q, q, cu.long(), cu, 4, 4)
    with simcuda.recording() as rec:  # a device tensor as the maximum length is read back: a sync
        varlen_attn(q, q, q, cu, cu, simcuda.to_device(torch.tensor(4)), 4)
    assert rec.syncs["_local_scalar_dense.default"] == 1
    with pytest.raises(simcuda.ContractError, match="takes"):
        varlen_attn(q.float(), q.float(), q.float(), cu, cu, 4, 4)
    with pytest.raises(simcuda.ContractError, match="math kernel"):
        torch.nn.functional.scaled_dot_product_attention(q[:, 0], q[:, 0], q[:, 0])  # 3-D
    with simcuda.recording() as rec:
        a.tolist(), a.cpu(), bool(a.any()), a[a > 0]
    assert rec.total_syncs == 4


@pytest.mark.slow  # 10 s; the classifier methods on the device stay in the fast tier
def test_detector_on_the_device(dev):
    from nested_svit.detection import create_detector

    torch.manual_seed(0)
    det = create_detector("svit_adapter_tiny_maskrcnn", img_scale=(160, 128), num_classes=3).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), rng.integers(0, 255, (150, 100, 3), dtype=np.uint8)]
    expected = det.predict(images, masks="rle")
    det.to(dev)
    det.predict(images[:1])  # device constants (anchors, stds, normalisers) are copied once
    with simcuda.recording() as rec:
        got = det.predict(images, masks="rle")
    assert rec.violations == [] and rec.mixing == []
    assert rec.total_syncs <= 150, rec.sync_sites.most_common(12)
    for a, b in zip(expected, got):  # the grid sampler (not the CPU's bag sum): equal to float rounding
        assert a.kept.tolist() == b.kept.tolist() and torch.equal(a.labels, b.labels)
        torch.testing.assert_close(b.boxes, a.boxes, atol=1e-3, rtol=1e-4)
    det.to(torch.bfloat16)  # half precision end to end, box arithmetic in fp32
    with simcuda.recording() as rec:
        half = det.predict(images)
    assert rec.violations == [] and all(r.boxes.dtype == torch.float32 for r in half)
    assert all(len(r.scores) for r in half)


def test_training_step_save_and_resume_on_the_device(dev, tmp_path):
    """One optimisation step on the device, saved; a resumed trainer continues exactly as the
    uninterrupted one (RNG states are restored from the CPU)."""
    from torch.utils.data import TensorDataset

    from nested_svit import SparseViT, ViTConfig
    from nested_svit.training import TrainConfig, Trainer

    def model():
        torch.manual_seed(0)
        return SparseViT(ViTConfig(embed_dim=32, num_heads=2, depth=4, patch_size=8, img_size=32, num_classes=4,
                                   gate_blocks=(1, 2, 3), keep_targets=(0.8, 0.5, 0.2)))

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g))
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, gate_lr=1e-2, device=str(dev))
    straight = Trainer(model(), data, cfg)
    with simcuda.recording() as rec:
        straight.fit(max_steps=3)
    assert rec.violations == [] and rec.mixing == []
    first = Trainer(model(), data, cfg, checkpoint_path=tmp_path / "ck.pth")
    first.fit(max_steps=2)
    first.save()
    resumed = Trainer(model(), data, cfg)
    resumed.resume(tmp_path / "ck.pth")
    resumed.fit(max_steps=1)
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(simcuda.to_cpu(a), simcuda.to_cpu(b)), k


@pytest.mark.slow
def test_flop_counting_is_the_same_with_every_backend(dev):
    """``count_flops`` counts jagged and varlen attention as the per-image SDPA they compute: the packed
    backends (including ``nested``, which failed before) give the loop backend's count on the CPU and on
    the device; ``padded`` computes (and counts) the padding on top: each image padded to its own token
    count, so a pruned model's padded rows, and nothing for a dense one."""
    from nested_svit.benchmark.flop_count import count_flops

    images = [torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(1)),
              torch.randn(3, 48, 80, generator=torch.Generator().manual_seed(2))]
    for name, dtype in (("svit_small", torch.float32), ("deit_small_patch16_224", torch.bfloat16)):
        model = lively_model(name)
        counts = {}
        for backend in ("loop", "padded", "nested"):
            model.set_execution("packed", backend)
            with torch.no_grad():
                counts[backend] = count_flops(lambda: model(images))
        model.to(dev).to(dtype)
        on_device = [i.to(dev).to(dtype) for i in images]
        for backend in ("loop", "nested") + (("varlen",) if dtype != torch.float32 else ()):
            model.set_execution("packed", backend)
            with torch.no_grad():
                counts[f"{backend}@device"] = count_flops(lambda: model(on_device))
        padded = counts.pop("padded")
        assert len(set(counts.values())) == 1 and counts["loop"] > 0, (name, counts, padded)
        assert padded > counts["loop"] if model.prunes else padded == counts["loop"], (name, counts, padded)


@pytest.mark.parametrize("device, local_rank, world, expected", [
    ("cuda", 1, 2, "cuda:1"), ("cuda:2", 1, 4, "cuda:3"), ("cuda:0", 3, 4, "cuda:3"), ("cuda:5", 0, 1, "cuda:5"),
    ("cpu", 1, 2, "cpu")])
def test_each_rank_gets_its_own_gpu(device, local_rank, world, expected):
    """Under torchrun ``--device cuda:N`` is the first GPU of the node's share: rank r uses N + local rank
    (before, every rank used GPU N)."""
    from nested_svit.distributed import DistInfo, rank_device

    assert rank_device(device, DistInfo(rank=local_rank, world_size=world, local_rank=local_rank)) == expected
