"""The official multi-scale + crop training augmentation (data/det_augment.py), checked against
independent facts: pixel coordinates coded into the image, mask-derived boxes, the policy's scale set."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nested_svit.data.det_augment import CROP_RANGE, MULTI_SCALES, Instances, hflip, multiscale_crop, random_crop, resize


def _coded(h: int, w: int, rects: list[tuple[int, int, int, int]]) -> Instances:
    """An image whose pixel (y, x) holds (y % 256, x % 256, 16 * (y // 256) + x // 256), with
    rectangular instances: boxes on pixel edges, masks filling them."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([yy % 256, xx % 256, 16 * (yy // 256) + xx // 256], -1).astype(np.uint8)
    masks = np.zeros((len(rects), h, w), dtype=bool)
    for k, (x1, y1, x2, y2) in enumerate(rects):
        masks[k, y1:y2, x1:x2] = True
    return Instances(image, np.array(rects, dtype=np.float32).reshape(-1, 4), np.arange(len(rects)), masks)


def _position(image: np.ndarray, y: int, x: int) -> tuple[int, int]:
    r, g, b = (int(v) for v in image[y, x])
    return 256 * (b // 16) + r, 256 * (b % 16) + g


def test_random_crop_matches_the_coded_pixels():
    rects = [(10, 20, 300, 200), (600, 400, 900, 690), (0, 0, 5, 5)]
    sizes = set()
    for seed in range(40):
        x = _coded(700, 1000, rects)
        out = random_crop(x, CROP_RANGE, torch.Generator().manual_seed(seed))
        h, w = out.size
        assert CROP_RANGE[0] <= h <= CROP_RANGE[1] and CROP_RANGE[0] <= w <= CROP_RANGE[1]
        sizes.add((h, w))
        top, left = _position(out.image, 0, 0)
        assert _position(out.image, h - 1, w - 1) == (top + h - 1, left + w - 1)  # a plain window
        expected = np.array(rects, dtype=np.float32) - [left, top, left, top]
        expected[:, 0::2] = expected[:, 0::2].clip(0, w)
        expected[:, 1::2] = expected[:, 1::2].clip(0, h)
        keep = (expected[:, 2] > expected[:, 0]) & (expected[:, 3] > expected[:, 1])
        np.testing.assert_array_equal(out.boxes, expected[keep])
        np.testing.assert_array_equal(out.labels, np.arange(3)[keep])
        np.testing.assert_array_equal(out.masks, x.masks[keep][:, top:top + h, left:left + w])
    assert len(sizes) > 30  # drawn, not fixed


def test_random_crop_of_a_small_image_is_the_whole_image():
    x = _coded(50, 80, [(3, 4, 20, 30)])
    out = random_crop(x, CROP_RANGE, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(out.image, x.image)
    np.testing.assert_array_equal(out.boxes, x.boxes)


def _mask_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def test_policy_scales_and_box_mask_agreement():
    """Over many draws: the short side is always one of the policy's 480..800 (a 4:3 image never meets
    the 1333 limit), both policies occur (crops change the aspect ratio), and every box equals the
    bounding box of its own transformed mask within the resize rounding."""
    shorts, same_aspect = set(), 0
    rects = [(30, 40, 200, 150), (350, 250, 630, 470), (500, 10, 620, 90)]
    for seed in range(60):
        x = _coded(480, 640, rects)
        out = multiscale_crop(hflip(x) if seed % 2 else x, torch.Generator().manual_seed(seed))
        h, w = out.size
        shorts.add(min(h, w))
        same_aspect += (h, w) == (min(h, w), round(min(h, w) * 4 / 3)) or abs(w / h - 4 / 3) < 0.01
        assert out.masks.shape == (len(out.boxes), h, w)
        for box, mask in zip(out.boxes, out.masks):
            if mask.any():
                # nearest-neighbour masks move an edge by up to one source pixel at each of two resizes
                assert np.abs(box - _mask_box(mask)).max() <= 1.5 + 0.004 * max(h, w), (seed, box, _mask_box(mask))
    assert shorts <= {s for _, s in MULTI_SCALES} and len(shorts) > 6
    assert 15 <= same_aspect <= 45  # about half the draws take the resize-only policy


def test_resize_clips_boxes_and_scales_per_axis():
    x = Instances(np.zeros((100, 150, 3), np.uint8), np.array([[-4.0, 10.0, 160.0, 50.0]], np.float32),
                  np.array([1]), np.zeros((1, 100, 150), bool))
    out = resize(x, (1333, 200))  # scale 2: 300 x 200
    assert out.size == (200, 300)
    np.testing.assert_allclose(out.boxes, [[0.0, 20.0, 300.0, 100.0]])


def test_train_data_multiscale(tmp_path):
    """CocoTrainData with the policy: sizes follow the policy, boxes lie on their masks, the draw is a
    function of (seed, epoch, index) only, and the default pipeline is unchanged (one scale)."""
    from coco_fixtures import make_coco

    from nested_svit.data.coco import CocoTrainData

    ann, images = make_coco(tmp_path / "coco")
    data = CocoTrainData(ann, images, (1333, 800), seed=3, multiscale=True)
    sizes = set()
    for epoch in range(4):
        data.epoch = epoch
        for i in range(len(data)):
            tensor, target = data[i]
            h, w = target["img_shape"]
            sizes.add(min(h, w))
            assert tensor.shape[1] % 32 == 0 and tensor.shape[2] % 32 == 0
            for box, mask in zip(target["boxes"].numpy(), target["masks"].numpy()):
                if mask.any():
                    # masks were upscaled from ~100 px images by nearest neighbour; a wrong flip or crop is off by 10s
                    assert np.abs(box - _mask_box(mask)).max() <= 1.5 + max(h, w) / 100
    assert sizes <= {s for _, s in MULTI_SCALES} | {min(MULTI_SCALES)[1]} and len(sizes) > 3
    data.epoch = 1
    again = CocoTrainData(ann, images, (1333, 800), seed=3, multiscale=True)
    again.epoch = 1
    assert torch.equal(data[2][0], again[2][0])
    plain = CocoTrainData(ann, images, (200, 120), seed=3)
    # keep-ratio sizes of the fixture's (h, w) at (200, 120), worked by hand: s = min(200 / long, 120 / short)
    assert [tuple(plain[i][1]["img_shape"]) for i in range(len(plain))] == [(120, 160), (160, 120), (96, 200),
                                                                            (120, 160), (120, 120)]


@pytest.mark.parametrize("empty", [pytest.param(0, marks=pytest.mark.slow),  # ~5 s each: the slow tier
                                   pytest.param(1, marks=pytest.mark.slow)])
def test_losses_with_an_image_left_without_instances(empty):
    """A crop may leave an image with no instance (allow_negative_crop): the losses stay finite and
    backpropagate; that image contributes negatives only."""
    from nested_svit.detection import create_detector
    from nested_svit.detection import detector_losses

    torch.manual_seed(0)
    det = create_detector("svit_adapter_tiny_maskrcnn", num_classes=3).train().set_execution("masked")
    inputs = [torch.randn(3, 96, 128), torch.randn(3, 128, 96)]
    targets = [{"boxes": torch.tensor([[8.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1]),
                "masks": torch.zeros(1, *x.shape[1:], dtype=torch.bool)} for x in inputs]
    targets[empty] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                      "masks": torch.zeros(0, *inputs[empty].shape[1:], dtype=torch.bool)}
    losses, _ = detector_losses(det, inputs, targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    losses["loss"].backward()
