"""The paper's baselines and ATC's (ATC, ToMe) as ViT-Adapter detector backbones (Tables 2 and 5; ATC's
MMDet_setup): batched over images of different sizes == one image at a time, each image's keep counts
from its own token count, the artificial class token, remove vs preserve as the adapter reads the
tokens, and ATC's adapter against its authors' structure (unmerge / re-merge around the adapter layers)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nested_svit.detection import create_detector

NAMES = ["dynamicvit_adapter_tiny_maskrcnn", "evit_adapter_tiny_maskrcnn", "evovit_adapter_tiny_maskrcnn",
         "ats_adapter_tiny_maskrcnn", "atc_adapter_tiny_maskrcnn", "tome_adapter_tiny_maskrcnn"]
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
    if name.startswith(("atc", "tome")):  # int(0.7 t) of the t tokens each of blocks 3/6/9 gets, no class token
        stages = [n0]
        for _ in range(3):
            stages.append(int(0.7 * stages[-1]))
        return [n for n in stages for _ in range(3)]
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
@pytest.mark.parametrize("name", ["evit_adapter_tiny_maskrcnn", "ats_adapter_tiny_maskrcnn", "atc_adapter_tiny_maskrcnn",
                                  "tome_adapter_tiny_maskrcnn"])
def test_parameter_free_baselines_train_in_the_packed_execution(name):
    """EViT / ATS / ATC / ToMe backbones fine-tune through their own hard selection or merging (the authors'
    training path): losses finite and falling on a fixed batch, gradients reach the blocks after the first
    selection and the artificial class token (where there is one); with drop path on packed rows."""
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
        grads = {"late": det.backbone.blocks[10].mlp.fc1.weight.grad}
        if det.backbone.cls_token is not None:
            grads["cls"] = det.backbone.cls_token.grad
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
        opt.step()
        history.append(float(losses["loss"].detach()))
    assert history[-1] < history[0]
    assert usage.kept_mlp[0, -1] < usage.kept_mlp[0, 0]  # it still prunes while training


def test_dynamicvit_training_is_refused_clearly():
    with pytest.raises(ValueError, match="training DynamicViT is not implemented"):
        _detector("dynamicvit_adapter_tiny_maskrcnn").backbone.training_execution()


@pytest.mark.parametrize("name,linkage", [("atc_adapter_tiny_maskrcnn", "average"),
                                          ("atc_adapter_tiny_maskrcnn", "complete"),
                                          ("tome_adapter_tiny_maskrcnn", "tome")])
def test_atc_and_tome_backbones_equal_the_authors_adapter_per_image(name, linkage):
    """ATC's ``ToMeATCViTAdapter`` written from its MMDet_setup (tests/detection_reference.py, scikit-learn
    clustering or ToMe's matching, unmerge before each injector and extractor, re-merge after the
    injector): the same four maps and tokens per block. The injectors' gamma is random (it starts at
    zero), so the unmerge / re-merge around them counts."""
    from detection_reference import to_official, tomeatc_backbone
    from nested_svit.config import Pruning

    overrides = {}
    if linkage == "complete":
        overrides["pruning"] = Pruning("atc", (3, 6, 9), (0.7,) * 3,
                                       options={"linkage": "complete", "of_current": True})
    det = _detector(name, **overrides)
    with torch.no_grad():
        for inter in det.backbone.interactions:
            inter.injector.gamma.normal_(std=1.0)
    img = torch.randn(3, 128, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats, usage = det.backbone.forward_features([img])
    expected, kept = tomeatc_backbone(to_official(det.state_dict(), False), img[None], 192, 3, linkage)
    assert usage.kept_mlp[0].tolist() == kept == _expected_counts(name, 80)
    for ours, theirs in zip(feats[0], expected):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_atc_detector_file_with_its_backbone_classifier_keys_loads(tmp_path):
    """ATC's detection files keep timm's class token, final norm and 80-class head in the backbone, which
    no adapter layer reads: they are ignored, said in the report, and every other key loads."""
    from nested_svit import load_checkpoint

    source = _detector("atc_adapter_tiny_maskrcnn")
    state = dict(source.state_dict())
    state.update({"backbone.cls_token": torch.zeros(1, 1, 192), "backbone.norm.weight": torch.ones(192),
                  "backbone.norm.bias": torch.zeros(192), "backbone.head.weight": torch.zeros(80, 192),
                  "backbone.head.bias": torch.zeros(80)})
    torch.save({"meta": {"epoch": 4}, "state_dict": state}, tmp_path / "atc_small-coco17.pth")
    torch.manual_seed(3)
    target = create_detector("atc_adapter_tiny_maskrcnn", num_classes=3).eval()
    report = load_checkpoint(target, tmp_path / "atc_small-coco17.pth")
    assert any("ignored 5 backbone classifier keys" in n for n in report.notes), report.notes
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


@pytest.mark.slow
@pytest.mark.parametrize("name", ["atc_adapter_tiny_maskrcnn", "tome_adapter_tiny_maskrcnn"])
def test_atc_and_tome_detectors_eval_coco_and_predict_ragged_batches_as_single_images(tmp_path, name):
    """``eval coco`` and ``predict`` with a file of the ATC (ToMe) detector: batches of 3 images of mixed
    sizes give the detections, masks and APs of one image at a time."""
    import json

    import pandas as pd
    from coco_fixtures import make_coco
    from nested_svit.cli import main
    from nested_svit.detection.checkpoint import save_detector_checkpoint

    torch.manual_seed(0)
    det = create_detector(name, img_scale=(192, 128), num_classes=2, class_names=("square", "bar"))
    with torch.no_grad():
        for inter in det.backbone.interactions:
            inter.injector.gamma.normal_(std=1.0)
    save_detector_checkpoint(det, tmp_path / "det.pth")
    ann, images = make_coco(tmp_path / "coco")
    common = ["--checkpoint", str(tmp_path / "det.pth"), "--workers", "0", "--threads", "1"]
    results, rows = {}, {}
    for batch in ("3", "1"):
        out = tmp_path / f"eval{batch}.json"
        assert main(["eval", "coco", *common, "--ann", str(ann), "--images", str(images), "--batch-size", batch,
                     "--out", str(out)]) == 0
        results[batch] = json.loads(out.read_text())
        results[batch]["dets"] = json.loads(Path(results[batch]["detections_file"]).read_text())
        assert main(["predict", *common, "--input", str(images), "--batch-size", batch,
                     "--out", str(tmp_path / f"rows{batch}.jsonl")]) == 0
        rows[batch] = pd.read_json(tmp_path / f"rows{batch}.jsonl", lines=True)
    assert results["3"]["dets"] == results["1"]["dets"] and len(results["1"]["dets"]) > 0
    for iou in ("bbox", "segm"):
        assert results["3"][iou] == results["1"][iou]
    pd.testing.assert_frame_equal(rows["3"], rows["1"])
