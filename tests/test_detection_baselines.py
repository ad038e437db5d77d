"""The paper's baselines as ViT-Adapter detector backbones (Tables 2 and 5): batched over images of
different sizes == one image at a time, each image's keep counts from its own token count, the
artificial class token, and remove vs preserve as the adapter reads the tokens."""
from __future__ import annotations

import math

import pytest
import torch

from nested_svit.detection import create_detector

NAMES = ["dynamicvit_adapter_tiny_maskrcnn", "evit_adapter_tiny_maskrcnn", "evovit_adapter_tiny_maskrcnn",
         "ats_adapter_tiny_maskrcnn"]
SIZES = [(128, 160), (96, 96), (160, 64)]


def _detector(name: str, **overrides):
    torch.manual_seed(0)
    return create_detector(name, num_classes=3, **overrides).eval()


def _expected_counts(name: str, n0: int) -> list[int] | None:
    """Tokens each block's MLP processes, from the method's rule (None: data-dependent, ATS)."""
    if name.startswith("dynamicvit"):
        stages = [n0] + [int(n0 * 0.7 ** s) for s in (1, 2, 3)]
        return [stages[0]] * 3 + [stages[1]] * 3 + [stages[2]] * 3 + [stages[3]] * 3
    if name.startswith("evit"):
        n, out = n0 + 1, []
        for s in range(4):
            if s:
                n = 1 + math.ceil(0.7 * (n - 1)) + 1  # class token, kept, the new fused token
            out += [n] * 3
        return out
    if name.startswith("evovit"):
        return [n0 + 1] * 3 + [1 + int(n0 * t) for t in (0.7, 0.49, 0.343) for _ in range(3)]
    return None


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_batch_of_sizes_equals_single_images_and_the_rules(name):
    det = _detector(name)
    images = [torch.randn(3, h, w, generator=torch.Generator().manual_seed(i)) for i, (h, w) in enumerate(SIZES)]
    with torch.no_grad():
        feats, usage = det.backbone.forward_features(images)
        det.backbone.set_execution("reference")
        ref_feats, ref_usage = det.backbone.forward_features(images)
        det.backbone.set_execution("packed")
        single = [det.backbone.forward_features([img]) for img in images]
    assert torch.equal(usage.kept_mlp, ref_usage.kept_mlp)
    for g, img in enumerate(images):  # one size group per image (group_by="image")
        for level in range(4):
            torch.testing.assert_close(feats[g][level], ref_feats[g][level], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(feats[g][level], single[g][0][0][level], atol=1e-4, rtol=1e-4)
        n0 = (img.shape[1] // 16) * (img.shape[2] // 16)
        assert usage.kept_mlp[g].tolist() == single[g][1].kept_mlp[0].tolist()
        expected = _expected_counts(name, n0)
        if expected is not None:
            assert usage.kept_mlp[g].tolist() == expected
        else:  # ATS: a variable count per image, never more than the tokens there are, only shrinking
            counts = usage.kept_mlp[g].tolist()
            assert counts[:3] == [n0 + 1] * 3 and all(a >= b for a, b in zip(counts, counts[1:]))
    with torch.no_grad():
        dets = det.predict([img.permute(1, 2, 0).mul(40).add(128).clamp(0, 255).byte().numpy() for img in images])
    assert len(dets) == 3


@pytest.mark.parametrize("name", ["evit_adapter_tiny_maskrcnn", "ats_adapter_tiny_maskrcnn",
                                  "dynamicvit_adapter_tiny_maskrcnn"])
def test_remove_reads_dropped_tokens_as_zero(name, monkeypatch):
    """What the adapter's output reads: with ``remove_pruned`` the patch tokens not active at the end
    are zero and the others equal the preserving model's."""
    from nested_svit.detection.adapter import ViTAdapter

    seen: list = []
    original = ViTAdapter._output_maps

    def spy(self, g, x, c, c1):
        seen.append(x.clone())
        return original(self, g, x, c, c1)

    monkeypatch.setattr(ViTAdapter, "_output_maps", spy)
    image = [torch.randn(3, 128, 160)]
    preserve, remove = _detector(name), _detector(name, remove_pruned=True)
    with torch.no_grad():
        usage = preserve.backbone.forward_features(image)[1]
        remove.backbone.forward_features(image)
    kept, removed = seen  # [1, 80, C] patch tokens as the output reads them
    front = 1 if preserve.backbone.cls_token is not None else 0
    active = usage.masks[-1][front:front + 80]  # the last selection's kept patch rows
    assert 0 < int(active.sum()) < 80
    assert (removed[0, ~active] == 0).all() and (kept[0, ~active] != 0).any(-1).all()
    torch.testing.assert_close(removed[0, active], kept[0, active])


def test_dense_detector_checkpoint_loads_with_a_random_class_token(tmp_path):
    from nested_svit import load_checkpoint
    from nested_svit.detection.checkpoint import save_detector_checkpoint

    dense = _detector("vit_adapter_tiny_maskrcnn")
    save_detector_checkpoint(dense, tmp_path / "dense.pth")
    evit = _detector("evit_adapter_tiny_maskrcnn")
    report = load_checkpoint(evit, tmp_path / "dense.pth")
    assert any("class token" in n for n in report.notes)
    for k, v in dense.state_dict().items():
        assert torch.equal(evit.state_dict()[k], v), k


@pytest.mark.slow
@pytest.mark.parametrize("name", ["evit_adapter_tiny_maskrcnn", "ats_adapter_tiny_maskrcnn"])
def test_parameter_free_baselines_train_in_the_packed_execution(name):
    """EViT / ATS backbones fine-tune through their own hard selection (the authors' training path):
    losses finite and falling on a fixed batch, gradients reach the blocks after the first selection
    and the artificial class token; with drop path on packed rows."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_detection_training import _batch

    from nested_svit.detection import detector_losses

    det = _detector(name).train()
    det.backbone.set_execution(det.backbone.training_execution()).set_drop_path(0.1)
    assert det.backbone.execution == "packed"
    inputs, targets = _batch()
    opt = torch.optim.AdamW(det.parameters(), lr=2e-4)
    history = []
    for _ in range(5):
        torch.manual_seed(1)
        losses, usage = detector_losses(det, inputs, targets)
        assert "loss_ratio" not in losses and all(torch.isfinite(v) for v in losses.values())
        opt.zero_grad()
        losses["loss"].backward()
        grads = {"cls": det.backbone.cls_token.grad, "late": det.backbone.blocks[10].mlp.fc1.weight.grad}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
        opt.step()
        history.append(float(losses["loss"].detach()))
    assert history[-1] < history[0]
    assert usage.kept_mlp[0, -1] < usage.kept_mlp[0, 0]  # it still prunes while training


def test_dynamicvit_training_is_refused_clearly():
    with pytest.raises(ValueError, match="training DynamicViT is not implemented"):
        _detector("dynamicvit_adapter_tiny_maskrcnn").backbone.training_execution()
