"""BatchNorm over ragged batches (detection/batchnorm.py) against torch's BatchNorm2d on the same
pixels laid out as one tensor."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from nested_svit.detection.batchnorm import ragged_batch_norm

HERE = Path(__file__).parent


def _as_one(xs: list[torch.Tensor]) -> torch.Tensor:
    """All pixels of ``[G, C, H, W]`` tensors as one ``[1, C, 1, P]`` tensor (what BN statistics see)."""
    return torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in xs], 1)[None, :, None]


def _split_like(y: torch.Tensor, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    parts = y[0, :, 0].split([x[:, 0].numel() for x in xs], 1)
    return [p.reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1) for p, x in zip(parts, xs)]


def test_training_statistics_over_all_tensors():
    from bn_sync_worker import make_bn

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 3, 5, 7, generator=gen) + 2, torch.randn(2, 3, 3, 4, generator=gen) * 3]
    mine, ref = make_bn(), make_bn()
    a = [x.clone().requires_grad_() for x in xs]
    b = _as_one(xs).requires_grad_()
    ys = ragged_batch_norm(mine, a)
    y_ref = ref(b)
    for y, r in zip(ys, _split_like(y_ref, xs)):
        torch.testing.assert_close(y, r, atol=1e-5, rtol=1e-5)
    weights = [torch.randn(y.shape, generator=gen) for y in ys]
    sum((y * w).sum() for y, w in zip(ys, weights)).backward()
    (y_ref * _as_one(weights)).sum().backward()
    for g, r in zip([x.grad for x in a], _split_like(b.grad, xs)):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine.weight.grad, ref.weight.grad)
    torch.testing.assert_close(mine.running_mean, ref.running_mean)
    torch.testing.assert_close(mine.running_var, ref.running_var)
    assert int(mine.num_batches_tracked) == 1


def test_eval_uses_running_statistics():
    from bn_sync_worker import make_bn

    bn = make_bn()
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(2.0)
    bn.eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ragged_batch_norm(bn, [x])[0], bn(x))


def test_adapter_groups_share_statistics():
    """Training with one group per image (ragged BN) == one size group of the same two images (plain BN)."""
    from nested_svit.detection import create_detector

    torch.manual_seed(0)
    det = create_detector("vit_adapter_tiny_maskrcnn", num_classes=2).train()
    images = [torch.randn(3, 64, 96), torch.randn(3, 64, 96)]
    outs = {}
    for group_by in ("image", "size"):
        model = copy.deepcopy(det)
        model.backbone.group_by = group_by
        outs[group_by] = model.backbone.forward_features(images)[0]
        outs[group_by + "_mean"] = model.backbone.spm.stem[1].running_mean
    for level in range(4):  # per group lists of 4 maps [G, C, h, w]: two groups of 1 vs one group of 2
        torch.testing.assert_close(torch.cat([g[level] for g in outs["image"]]), outs["size"][0][level],
                                   atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs["image_mean"], outs["size_mean"])


@pytest.mark.slow
def test_sync_over_two_ranks(tmp_path, torchrun):
    """``sync=True`` under torchrun: each rank's outputs, input gradients and running statistics equal
    BatchNorm2d over both ranks' pixels together."""
    from bn_sync_worker import make_bn, rank_inputs

    run = torchrun(str(HERE / "bn_sync_worker.py"), str(tmp_path / "out"), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    xs = rank_inputs(0) + rank_inputs(1)
    ref = make_bn()
    b = _as_one(xs).requires_grad_()
    y = ref(b)
    weights = [torch.full_like(x, float(k + 1)) for k, x in enumerate(rank_inputs(0))] + \
              [torch.full_like(x, 1.0) for x in rank_inputs(1)]
    (y * _as_one(weights)).sum().backward()
    ys, grads = _split_like(y, xs), _split_like(b.grad, xs)
    got = [torch.load(f"{tmp_path / 'out'}.{r}", weights_only=True) for r in range(2)]
    for mine, r, g in zip(got[0]["ys"] + got[1]["ys"], ys, grads):
        torch.testing.assert_close(mine, r, atol=1e-5, rtol=1e-5)
    for mine, g in zip(got[0]["grads"] + got[1]["grads"], grads):
        torch.testing.assert_close(mine, g, atol=1e-5, rtol=1e-5)
    for r in range(2):
        torch.testing.assert_close(got[r]["mean"], ref.running_mean)
        torch.testing.assert_close(got[r]["var"], ref.running_var)
