"""Detector: batch == per image, executions, the official algorithm, checkpoints, and the mmdet rules
of the neck/heads/preprocessing against independent references."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detection_reference import official_backbone, to_official
from helpers import rel_err
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import clip_boxes_to_image, nms

from nested_svit import load_checkpoint
from nested_svit.checkpoint import CheckpointError
from nested_svit.detection import create_detector, list_detectors, preprocess
from nested_svit.detection import boxes as box_ops
from nested_svit.detection.checkpoint import save_detector_checkpoint
from nested_svit.detection.msda import sample_bag, sample_grid
from nested_svit.detection.roi_heads import map_roi_levels, paste_masks

SCALE = (192, 128)
SIZES = [(120, 160), (160, 120), (96, 200), (120, 160)]  # two of one size, three aspect ratios


def _images(seed: int = 0, sizes=SIZES) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        img[h // 4:h // 2, w // 4: w // 2] = (220, 40, 40)  # some structure
        out.append(img)
    return out


_cache: dict[str, torch.nn.Module] = {}


def detector(name: str):
    if name not in _cache:
        torch.manual_seed(0)
        model = create_detector(name, img_scale=SCALE).eval()
        if model.backbone.num_gates:
            model.calibrate_keep(_images(9))
        _cache[name] = model
    return _cache[name]


def test_registry():
    assert list_detectors() == sorted(f"{m}_adapter_{s}_maskrcnn" for s in ("tiny", "small")
                                      for m in ("vit", "svit", "dynamicvit", "evit", "evovit", "ats", "atc", "tome"))
    from nested_svit.detection.registry import dense_detector

    assert dense_detector("evit_adapter_small_maskrcnn") == dense_detector("svit_adapter_small_maskrcnn") == \
        "vit_adapter_small_maskrcnn"
    # the baselines add only their artificial class token (EViT, Evo-ViT, ATS) or DynamicViT's 3 predictors
    dense_t = sum(p.numel() for p in create_detector("vit_adapter_tiny_maskrcnn").parameters())
    assert sum(p.numel() for p in create_detector("evit_adapter_tiny_maskrcnn").parameters()) == dense_t + 192
    predictor = 2 * 192 + 192 * 192 + 192 + 192 * 96 + 96 + 96 * 48 + 48 + 48 * 2 + 2
    assert sum(p.numel() for p in create_detector("dynamicvit_adapter_tiny_maskrcnn").parameters()) == \
        dense_t + 3 * predictor
    for merging in ("atc", "tome"):  # no class token, no parameters: the dense detector's weights
        assert sum(p.numel() for p in create_detector(f"{merging}_adapter_tiny_maskrcnn").parameters()) == dense_t
    # parameter counts of the official models (spec, counted by building them)
    assert sum(p.numel() for p in create_detector("svit_adapter_tiny_maskrcnn").parameters()) == 28_151_618
    assert sum(p.numel() for p in create_detector("vit_adapter_small_maskrcnn").parameters()) == 47_793_152
    with pytest.raises(ValueError, match="unknown detector option"):
        create_detector("svit_adapter_tiny_maskrcnn", bogus=1)
    assert create_detector("vit_adapter_tiny_maskrcnn", num_classes=3).roi_head.bbox_head.fc_cls.out_features == 4


@pytest.mark.parametrize("name", ["svit_adapter_tiny_maskrcnn", pytest.param("svit_adapter_small_maskrcnn", marks=pytest.mark.slow),
                                  pytest.param("vit_adapter_tiny_maskrcnn", marks=pytest.mark.slow),
                                  pytest.param("vit_adapter_small_maskrcnn", marks=pytest.mark.slow)])
def test_mixed_size_batch_equals_per_image(name):
    model = detector(name)
    images = _images()
    batch = model.predict(images)
    inputs, _ = model.preprocess(images)
    with torch.inference_mode():
        feats_batch, usage_batch, groups = model.forward_backbone(inputs)
    assert [g.count for g in groups] == [1, 1, 1, 1]  # spatial layers per image (default)
    for i, img in enumerate(images):
        single = model.predict([img])[0]
        assert torch.equal(batch[i].kept, single.kept)
        assert torch.equal(batch[i].labels, single.labels)
        assert torch.allclose(batch[i].boxes, single.boxes, atol=1e-4) and torch.allclose(batch[i].scores, single.scores)
        # last-bit differences between batched and per-image heads (scores agree to ~3e-7, bitwise on some CPUs)
        # can flip a mask pixel whose probability sits at the 0.5 threshold: at most 1 in 10,000 pixels
        assert batch[i].masks.shape == single.masks.shape
        assert int((batch[i].masks != single.masks).sum()) <= max(1, single.masks.numel() // 10_000)
        assert batch[i].masks.shape[1:] == img.shape[:2]
        with torch.inference_mode():
            feats_single, usage_single, _ = model.forward_backbone([inputs[i]])
        for a, b in zip(feats_batch[i], feats_single[0]):
            assert rel_err(a, b) <= 1e-4
    if model.backbone.num_gates:  # gates really pruned, differently per image
        ratios = usage_batch.keep_ratio()[:, 3:]
        assert ratios.min() < 0.9 and len({tuple(r) for r in usage_batch.kept.tolist()}) > 1


def test_size_groups_equal_per_image_groups():
    model = detector("svit_adapter_tiny_maskrcnn")
    inputs, _ = model.preprocess(_images())
    order = sorted(range(4), key=lambda i: tuple(inputs[i].shape[-2:]))
    inputs = [inputs[i] for i in order]
    with torch.inference_mode():
        by_image = model.forward_backbone(inputs)
        model.backbone.group_by = "size"
        try:
            by_size = model.forward_backbone(inputs)
        finally:
            model.backbone.group_by = "image"
    assert [g.count for g in by_size[2]] == [1, 2, 1]
    assert torch.equal(by_image[1].kept, by_size[1].kept)
    for gi, g in enumerate(by_size[2]):
        for j in range(g.count):
            for a, b in zip(by_size[0][gi], by_image[0][g.start + j]):
                assert rel_err(a[j], b[0]) <= 1e-4


@pytest.mark.parametrize("execution", ["masked", "reference"])
def test_executions_match_packed(execution):
    model = detector("svit_adapter_tiny_maskrcnn")
    inputs, _ = model.preprocess(_images())
    with torch.inference_mode():
        packed = model.forward_backbone(inputs)
        model.set_execution(execution)
        try:
            other = model.forward_backbone(inputs)
        finally:
            model.set_execution("packed")
    assert torch.equal(packed[1].kept, other[1].kept)
    for fa, fb in zip(packed[0], other[0]):
        for a, b in zip(fa, fb):
            assert rel_err(a, b) <= 1e-5


def test_backbone_matches_official_algorithm():
    """Our packed backbone on an official-layout checkpoint == an independent batch-1 forward written
    from the official code (nn.TransformerEncoderLayer blocks, argsort gather/scatter_)."""
    model = detector("svit_adapter_tiny_maskrcnn")
    official = to_official(model.state_dict(), gated=True)
    fresh = create_detector("svit_adapter_tiny_maskrcnn", img_scale=SCALE).eval()
    assert load_checkpoint(fresh, {"meta": {}, "state_dict": official}).format == "mmdet-svit"
    inputs, _ = fresh.preprocess(_images()[:3])
    with torch.inference_mode():
        ours, usage, _ = fresh.forward_backbone(inputs)
    for i, t in enumerate(inputs):
        ref_maps, ref_kept = official_backbone(official, t[None], 192, 3)
        assert usage.kept[i].tolist() == ref_kept
        for a, b in zip(ours[i], ref_maps):
            assert rel_err(a, b) <= 1e-4
    assert usage.kept[:, 3:].float().mean() < usage.kept[:, :3].float().mean()  # the comparison covered pruning


@pytest.mark.slow
def test_gate_may_keep_nothing():
    model = create_detector("svit_adapter_tiny_maskrcnn", img_scale=SCALE).eval()
    model.calibrate_keep(_images(3), [1.0, 0.0, 0.5, 0.0, 0.0, 0.3, 0.0, 0.2, 0.0])
    out = model.predict(_images()[:2])
    for d in out:
        assert d.kept[4] == 0 and d.kept[3] == d.total
        assert torch.isfinite(d.boxes).all() and torch.isfinite(d.scores).all()


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name,gated", [("svit_adapter_tiny_maskrcnn", True),
                                        pytest.param("vit_adapter_tiny_maskrcnn", False, marks=pytest.mark.slow)])
def test_official_checkpoint_round_trip(tmp_path, name, gated):
    src = detector(name)
    path = tmp_path / "official.pth"
    torch.save({"meta": {"CLASSES": ["x"] * 80, "epoch": 36}, "state_dict": to_official(src.state_dict(), gated),
                "optimizer": {"state": {}, "param_groups": []}}, path)
    model = create_detector(name, img_scale=SCALE).eval()
    report = load_checkpoint(model, path)
    assert report.format == ("mmdet-svit" if gated else "mmdet-dense") and report.sha256
    assert model.backbone.blocks[0].norm1.eps == (1e-5 if gated else 1e-6)
    images = _images()[:1]  # one image: the weights are what is compared (batches: test_mixed_size_batch_...)
    first = model.predict(images)
    ours = tmp_path / "ours.pth"
    save_detector_checkpoint(model, ours)
    again = create_detector(name, img_scale=SCALE).eval()
    assert load_checkpoint(again, ours).format == "nested_svit"
    for a, b in zip(first, again.predict(images)):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.kept, b.kept) and torch.equal(a.masks, b.masks)


def test_wrong_keys_listed():
    model = create_detector("svit_adapter_tiny_maskrcnn")
    state = to_official(model.state_dict(), gated=True)
    del state["neck.fpn_convs.2.conv.weight"], state["backbone.selective_modules.4.norm.bias"]
    state["roi_head.bbox_head.fc_extra.weight"] = torch.zeros(1)
    state["rpn_head.rpn_cls.weight"] = torch.zeros(5, 256, 1, 1)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(model, {"state_dict": state})
    msg = str(e.value)
    for key in ("neck.fpn_convs.2.conv.weight", "backbone.gates.4.norm.bias", "roi_head.bbox_head.fc_extra.weight",
                "rpn_head.rpn_cls.weight: checkpoint (5, 256, 1, 1)"):
        assert key in msg


def test_deit_imagenet_checkpoint_into_backbone_only():
    from nested_svit import create_model

    torch.manual_seed(5)
    deit = create_model("deit_tiny_patch16_224")
    det = create_detector("svit_adapter_tiny_maskrcnn")
    before = {k: v.clone() for k, v in det.state_dict().items()}
    report = load_checkpoint(det, {"model": deit.state_dict()})
    assert report.format == "imagenet" and any("ignored" in n for n in report.notes)
    sd = det.state_dict()
    assert torch.equal(sd["backbone.pos_embed"], deit.pos_embed)
    assert torch.equal(sd["backbone.blocks.7.attn.qkv.weight"], deit.blocks[7].attn.qkv.weight)
    assert torch.equal(sd["backbone.patch_embed.proj.weight"], deit.patch_embed.proj.weight)
    for key in ("backbone.spm.fc1.weight", "neck.lateral_convs.0.conv.weight", "backbone.gates.0.mlp.fc1.weight"):
        assert torch.equal(sd[key], before[key])
    assert det.backbone.blocks[0].norm1.eps == 1e-6
    with pytest.raises(CheckpointError, match="mis-shaped"):  # DeiT-S weights for a DeiT-T backbone
        load_checkpoint(create_detector("svit_adapter_tiny_maskrcnn"), {"model": create_model("deit_small_patch16_224").state_dict()})


# ---------------------------------------------------------------- mmdet rules vs independent references
def test_anchors_unrounded_fixed_stride():
    base = box_ops.base_anchors(4)
    assert torch.allclose(base[0], torch.tensor([-22.627417, -11.313708, 22.627417, 11.313708]))  # ratio 0.5: h/w
    assert torch.allclose(base[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    grid = box_ops.grid_anchors(box_ops.base_anchors(64), (13, 21), 64)
    assert grid.shape == (13 * 21 * 3, 4)
    y, x, a = 12, 20, 2  # flattening (y, x, anchor); P6 stride 64, not padded_size // feat_size
    cx = (grid[(y * 21 + x) * 3 + a, 0] + grid[(y * 21 + x) * 3 + a, 2]) / 2
    cy = (grid[(y * 21 + x) * 3 + a, 1] + grid[(y * 21 + x) * 3 + a, 3]) / 2
    assert (cx.item(), cy.item()) == (x * 64, y * 64)


def test_decode_matches_torchvision_box_coder():
    torch.manual_seed(0)
    rois = torch.rand(50, 2) * 100
    rois = torch.cat([rois, rois + torch.rand(50, 2) * 50 + 1], 1)
    deltas = torch.randn(50, 4) * 0.5
    ours = box_ops.decode(rois, deltas, (0.1, 0.1, 0.2, 0.2), (1000, 1000))
    ref = clip_boxes_to_image(BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).decode_single(deltas, rois), (1000, 1000))
    assert torch.allclose(ours, ref, atol=1e-4)
    clipped = box_ops.decode(rois, deltas, (0.1, 0.1, 0.2, 0.2), (60, 80))
    assert clipped[:, 0::2].max() <= 80 and clipped[:, 1::2].max() <= 60 and clipped.min() >= 0
    # symmetric clamp: very negative dw is clamped at -log(1000/16) (torchvision clamps only above)
    tiny = box_ops.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.tensor([[0.0, 0.0, -50.0, 0.0]]),
                          (1, 1, 1, 1), (1000, 1000))
    assert math.isclose(float(tiny[0, 2] - tiny[0, 0]), 100 * 16 / 1000, rel_tol=1e-5)


@pytest.mark.parametrize("split", [10000, 5])
def test_batched_nms_equals_per_class_nms(monkeypatch, split):
    monkeypatch.setattr(box_ops, "MMCV_NMS_SPLIT", split)
    torch.manual_seed(1)
    xy = torch.rand(300, 2) * 200
    boxes = torch.cat([xy, xy + torch.rand(300, 2) * 60 + 5], 1)
    scores, labels = torch.rand(300), torch.randint(0, 4, (300,))
    keep = box_ops.batched_nms(boxes, scores, labels, 0.5)
    expected = torch.cat([torch.nonzero(labels == c).view(-1)[nms(boxes[labels == c], scores[labels == c], 0.5)]
                          for c in range(4)])
    assert sorted(keep.tolist()) == sorted(expected.tolist())
    assert torch.all(scores[keep][:-1] >= scores[keep][1:])


def test_roi_level_mapping_hand_values():
    rois = torch.tensor([[0, 0, 0, 30, 30], [0, 0, 0, 56, 56], [0, 0, 0, 111, 112], [0, 0, 0, 112, 112],
                         [0, 0, 0, 224, 224], [0, 0, 0, 900, 900]], dtype=torch.float32)
    assert map_roi_levels(rois).tolist() == [0, 0, 0, 1, 2, 3]


def test_mask_paste_equals_whole_image_grid_sample():
    """mmdet ``_do_paste_mask`` over the whole image (GPU path) written out directly."""
    torch.manual_seed(2)
    probs = torch.rand(7, 28, 28)
    probs[6] = 1.0  # a large confident box: its samples spill half a cell (10 px) beyond it
    boxes = torch.tensor([[10.3, 5.2, 90.7, 60.1], [0.0, 0.0, 150.0, 100.0], [120.5, 80.2, 149.9, 99.5],
                          [40.0, 30.0, 41.5, 33.0], [-5.0, -3.0, 20.0, 10.0], [60.0, 10.0, 140.0, 95.0],
                          [20.0, 15.0, 580.0, 575.0]])
    h, w = 600, 620
    img_y = torch.arange(h, dtype=torch.float32) + 0.5
    img_x = torch.arange(w, dtype=torch.float32) + 0.5
    x0, y0, x1, y1 = boxes.split(1, 1)
    gy = ((img_y - y0) / (y1 - y0) * 2 - 1)[:, :, None].expand(7, h, w)
    gx = ((img_x - x0) / (x1 - x0) * 2 - 1)[:, None, :].expand(7, h, w)
    sampled = F.grid_sample(probs[:, None], torch.stack([gx, gy], 3), align_corners=False)[:, 0]
    for thr in (0.5, 0.2):
        assert torch.equal(paste_masks(probs, boxes, h, w, thr), sampled >= thr)
    assert sampled[6, 300, 15] >= 0.2 and sampled[6, 300, 5] == 0  # 5 px left of the box: still sampled


def test_preprocess_as_mmdet():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    t, meta = preprocess(img, (1333, 800))
    s = min(1333 / 640, 800 / 480)
    new_w, new_h = int(640 * s + 0.5), int(480 * s + 0.5)
    assert (meta.img_shape, meta.ori_shape) == ((new_h, new_w, 3), (480, 640, 3))
    assert meta.pad_shape == (math.ceil(new_h / 32) * 32, math.ceil(new_w / 32) * 32, 3) == (800, 1088, 3)
    assert meta.scale_factor == tuple(float(v) for v in np.array([new_w / 640, new_h / 480] * 2, dtype=np.float32))
    resized = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    expected = (resized - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375]
    assert np.abs(t[:, :new_h, :new_w].permute(1, 2, 0).numpy() - expected).max() < 1e-4
    assert t[:, new_h:].abs().sum() == 0 and t[:, :, new_w:].abs().sum() == 0
    _, meta2 = preprocess(rng.integers(0, 255, (333, 500, 3), dtype=np.uint8), (1333, 800))
    assert meta2.scale_factor[0] != meta2.scale_factor[1]  # per-axis factors differ in general
    with pytest.raises(ValueError, match="uint8"):
        preprocess(img.astype(np.float32))


def test_deformable_samplers_agree():
    torch.manual_seed(0)
    shapes = [(8, 12), (4, 6), (2, 3)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 3, 8)
    loc = torch.rand(2, 40, 3, 3, 4, 2) * 1.4 - 0.2  # includes points outside the maps
    weights = torch.rand(2, 40, 3, 3, 4)
    assert rel_err(sample_bag(value, shapes, loc, weights), sample_grid(value, shapes, loc, weights)) <= 1e-5
    # gradients too (training): w.r.t. values, locations and attention weights
    grads = []
    for fn in (sample_bag, sample_grid):
        v, lo, w = (t.clone().requires_grad_() for t in (value, loc, weights))
        (fn(v, shapes, lo, w) * torch.linspace(-1, 1, 24)).sum().backward()
        grads.append((v.grad, lo.grad, w.grad))
    for a, b in zip(*grads):
        assert rel_err(a, b) <= 1e-4
