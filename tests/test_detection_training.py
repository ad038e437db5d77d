"""Detector training losses (mmdet rules) on a mixed-size batch: assignment and targets against hand
values, losses finite and decreasing, gradients reaching the gates, keep fractions driven to targets."""
from __future__ import annotations

import pytest
import torch

from nested_svit.detection import create_detector
from nested_svit.detection.boxes import decode
from nested_svit.detection.losses import RCNN_ASSIGN, RPN_ASSIGN, assign, encode, mask_targets, sample_rois
from nested_svit.detection import detector_losses


def test_assign_hand_values():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0],    # IoU 1 with gt 0 -> 1
                          [0.0, 0.0, 10.0, 20.0],    # IoU 0.5 with gt 0: between thresholds -> ignored (RPN)
                          [50.0, 50.0, 60.0, 60.0],  # IoU 0 -> negative
                          [21.0, 21.0, 33.0, 33.0]])  # IoU 81/163=0.497 with gt 1: gt 1's best -> low-quality match
    assert assign(boxes, gt, RPN_ASSIGN).tolist() == [1, -1, 0, 2]
    assert assign(boxes, gt, RCNN_ASSIGN).tolist() == [1, 1, 0, 0]  # 0.5 >= 0.5 positive; 0.497 negative
    assert assign(boxes, gt[:0], RPN_ASSIGN).tolist() == [0, 0, 0, 0]


def test_encode_inverts_decode():
    torch.manual_seed(0)
    a = torch.rand(20, 2) * 100
    a = torch.cat([a, a + torch.rand(20, 2) * 40 + 2], 1)
    g = torch.rand(20, 2) * 100
    g = torch.cat([g, g + torch.rand(20, 2) * 40 + 2], 1)
    stds = (0.1, 0.1, 0.2, 0.2)
    assert torch.allclose(decode(a, encode(a, g, stds), stds, (1000, 1000)), g, atol=1e-3)


def test_mask_targets_cut_the_ground_truth():
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 16:48, 16:32] = True  # left half of the box below is inside the object
    samples = sample_rois(torch.zeros(0, 5), torch.tensor([[16.0, 16.0, 48.0, 48.0]]), torch.tensor([0]), 3)
    t = mask_targets([samples], [masks])
    assert t.shape == (1, 28, 28) and t[0, :, :13].all() and not t[0, :, 15:].any()


def _batch():
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(3, 128, 160, generator=gen), torch.randn(3, 160, 96, generator=gen)]
    targets = []
    for img in inputs:
        h, w = img.shape[-2:]
        boxes = torch.tensor([[8.0, 12.0, 70.0, 60.0], [30.0, 70.0, 90.0, 120.0]])
        masks = torch.zeros(2, h, w, dtype=torch.bool)
        for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[k, y1:y2, x1:x2] = True
            img[:, y1:y2, x1:x2] += 2.0 * (k + 1)  # something to detect
        targets.append({"boxes": boxes, "labels": torch.tensor([0, 2]), "masks": masks})
    return inputs, targets


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    det = create_detector("svit_adapter_tiny_maskrcnn", num_classes=3)
    return det.train().set_execution("masked")


@pytest.mark.slow
def test_losses_finite_and_decrease(detector):
    inputs, targets = _batch()
    opt = torch.optim.AdamW(detector.parameters(), lr=2e-4)
    history = []
    for _ in range(6):
        torch.manual_seed(1)  # same samples and Gumbel noise every step: a fixed batch
        losses, usage = detector_losses(detector, inputs, targets)
        assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask", "loss_ratio", "loss"}
        assert all(torch.isfinite(v) for v in losses.values())
        history.append({k: float(v.detach()) for k, v in losses.items()})
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    for key in ("loss_rpn_cls", "loss_cls", "loss_mask"):
        assert history[-1][key] < history[0][key], key
    assert usage.kept.shape == (2, 12)


@pytest.mark.slow
@pytest.mark.parametrize("term", ["task", "ratio"])
def test_gradients_reach_gates(detector, term):
    inputs, targets = _batch()
    detector.zero_grad()
    torch.manual_seed(2)
    losses, _ = detector_losses(detector, inputs, targets)
    loss = losses["loss_ratio"] if term == "ratio" else losses["loss"] - losses["loss_ratio"]
    loss.backward()
    grads = [g.mlp.fc2.weight.grad for g in detector.backbone.gates]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0


@pytest.mark.slow
def test_keep_fractions_driven_to_targets():
    torch.manual_seed(0)
    det = create_detector("svit_adapter_tiny_maskrcnn", num_classes=3).train().set_execution("masked")
    inputs, targets = _batch()
    gate_params = [p for g in det.backbone.gates for p in g.parameters()]
    opt = torch.optim.Adam(gate_params, lr=0.05)
    targets_keep = torch.tensor(det.config.vit.keep_targets)

    def fractions():
        with torch.no_grad():
            det.eval().set_execution("packed")
            usage = det.backbone.forward_usage(inputs)
            det.train().set_execution("masked")
        return usage.gate_keep_fraction()

    before = (fractions() - targets_keep).abs().mean()
    for _ in range(12):
        losses, _ = detector_losses(det, inputs, targets)
        opt.zero_grad()
        losses["loss_ratio"].backward()
        opt.step()
    after = (fractions() - targets_keep).abs().mean()
    assert after < 0.5 * before and after < 0.08


def _train_args(ann, images, out, *extra):
    return ["train", "--model", "svit_adapter_tiny_maskrcnn", "--ann", str(ann), "--images", str(images),
            "--img-scale", "192,128", "--batch-size", "2", "--workers", "0", "--threads", "1", "--warmup-steps", "1",
            "--lr", "1e-4", "--out", str(out), *extra]


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    """Two runs of 1 epoch + resume for the 2nd == one run of 2 epochs (bitwise), through the CLI."""
    from coco_fixtures import make_coco

    from nested_svit.cli import main

    ann, images = make_coco(tmp_path / "coco")
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    assert main(_train_args(ann, images, a, "--epochs", "1")) == 0
    first = torch.load(a, weights_only=True)
    assert first["epoch"] == 1 and first["model_config"]["num_classes"] == 2
    assert main(_train_args(ann, images, a, "--epochs", "2")) == 0  # resumes from a.pth
    assert main(_train_args(ann, images, b, "--epochs", "2")) == 0
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa["global_step"] == sb["global_step"] == 4
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    assert not torch.equal(sa["model"]["backbone.gates.0.mlp.fc2.weight"], first["model"]["backbone.gates.0.mlp.fc2.weight"])


@pytest.mark.slow
def test_trained_detector_feeds_eval_and_predict(tmp_path):
    """train -> eval coco -> predict on the produced checkpoint with no extra flags."""
    import json

    from coco_fixtures import make_coco

    from nested_svit.cli import main

    ann, images = make_coco(tmp_path / "coco")
    ckpt = tmp_path / "det.pth"
    assert main(_train_args(ann, images, ckpt, "--epochs", "1")) == 0
    out = tmp_path / "r.json"
    assert main(["eval", "coco", "--checkpoint", str(ckpt), "--ann", str(ann), "--images", str(images),
                 "--workers", "0", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["model"] == "svit_adapter_tiny_maskrcnn" and res["img_scale"] == [192, 128]
    preds = tmp_path / "p.json"
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(images), "--out", str(preds), "--workers", "0"]) == 0
    rows = json.loads(preds.read_text())
    assert len(rows) == 5 and all(set(r["names"]) <= {"square", "bar"} for r in rows)


@pytest.mark.slow  # ~6 s; the detector trainer's fast and slow tests train through forward
def test_forward_is_the_losses_in_training_and_the_detections_in_eval():
    """``detector(inputs, targets)`` in training mode is ``losses``; ``detector(inputs, metas=...)`` in eval
    mode is ``predict_preprocessed``; each mode refuses the other's call in one line."""
    from nested_svit.detection.adapter import AdapterConfig

    torch.manual_seed(0)
    det = create_detector("svit_adapter_tiny_maskrcnn", embed_dim=48, num_heads=2, num_classes=3, fpn_channels=16,
                          adapter=AdapterConfig(conv_inplane=8, deform_heads=2))
    inputs, targets = _batch()
    det.train().set_execution("masked")
    torch.manual_seed(1)
    via_forward, _ = det(inputs, targets)
    torch.manual_seed(1)
    direct, _ = detector_losses(det, inputs, targets)
    assert set(via_forward) == set(direct) and all(torch.equal(via_forward[k], direct[k]) for k in direct)
    with pytest.raises(ValueError, match="takes targets"):
        det(inputs)
    det.eval().set_execution("packed")
    images = [torch.randint(0, 255, (48, 64, 3), dtype=torch.uint8), torch.randint(0, 255, (40, 40, 3), dtype=torch.uint8)]
    inputs, metas = det.preprocess(images)
    got, want = det(inputs, metas=metas), det.predict_preprocessed(inputs, metas)
    assert [torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) for a, b in zip(got, want)] == [True, True]
    with pytest.raises(ValueError, match="ImageMeta"):
        det(inputs)
