"""mmdet 2.x training transforms for one image with its instances, in numpy, as the ViT-Adapter /
SViT Mask R-CNN configs chain them (``RandomFlip`` -> ``AutoAugment`` of two resize/crop policies).

Every random draw comes from a ``torch.Generator`` the caller seeds per (seed, epoch, index), so an
augmentation depends on nothing else (worker layout, resume point, rank).

``Instances``: ``image [H, W, 3]`` uint8, ``boxes [n, 4]`` float32 x1y1x2y2 pixels, ``labels [n]``,
``masks [n, H, W]`` bool.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from .det_transforms import rescale_size

# the official multi-scale policy: short side one of 480, 512, ..., 800, long side at most 1333
MULTI_SCALES: tuple[tuple[int, int], ...] = tuple((1333, s) for s in range(480, 801, 32))
# the crop policy: resize to short side 400/500/600, crop h and w in [384, 600], resize to MULTI_SCALES
CROP_PRE_SCALES: tuple[tuple[int, int], ...] = ((1333, 400), (1333, 500), (1333, 600))
CROP_RANGE: tuple[int, int] = (384, 600)


@dataclass
class Instances:
    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)"""
        return self.image.shape[0], self.image.shape[1]


def _randint(low: int, high: int, gen: torch.Generator) -> int:
    """Uniform integer in ``[low, high)`` (numpy's ``randint`` convention)."""
    return int(torch.randint(low, high, (), generator=gen))


def hflip(x: Instances) -> Instances:
    """mmdet ``RandomFlip`` (horizontal) once chosen: ``x1' = W - x2``, ``x2' = W - x1``."""
    w = x.size[1]
    boxes = x.boxes.copy()
    boxes[:, 0], boxes[:, 2] = w - x.boxes[:, 2], w - x.boxes[:, 0]
    return Instances(np.ascontiguousarray(x.image[:, ::-1]), boxes, x.labels,
                     np.ascontiguousarray(x.masks[:, :, ::-1]))


def resize(x: Instances, img_scale: tuple[int, int]) -> Instances:
    """mmdet ``Resize(keep_ratio=True)``: the largest size within ``img_scale`` (either order) with sizes
    ``int(x * s + 0.5)``; image bilinear (cv2 INTER_LINEAR), masks nearest; boxes times the per-axis
    factors ``new_w / w``, ``new_h / h``, clipped to the new image."""
    h, w = x.size
    new_w, new_h = rescale_size(w, h, img_scale)
    image = cv2.resize(x.image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    masks = np.zeros((len(x.masks), new_h, new_w), dtype=bool)
    for k, m in enumerate(x.masks):
        masks[k] = cv2.resize(m.view(np.uint8), (new_w, new_h), interpolation=cv2.INTER_NEAREST) > 0
    boxes = x.boxes * np.array([new_w / w, new_h / h, new_w / w, new_h / h], dtype=np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, new_w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, new_h)
    return Instances(image, boxes, x.labels, masks)


def random_crop(x: Instances, crop_range: tuple[int, int], gen: torch.Generator) -> Instances:
    """mmdet ``RandomCrop(crop_type='absolute_range', allow_negative_crop=True)``: crop height and width
    drawn in ``[min(side, lo), min(side, hi)]``, offset uniform; boxes shifted and clipped, instances
    whose box becomes empty dropped (an image may be left with none)."""
    h, w = x.size
    lo, hi = crop_range
    crop_h = _randint(min(h, lo), min(h, hi) + 1, gen)
    crop_w = _randint(min(w, lo), min(w, hi) + 1, gen)
    top = _randint(0, max(h - crop_h, 0) + 1, gen)
    left = _randint(0, max(w - crop_w, 0) + 1, gen)
    image = x.image[top:top + crop_h, left:left + crop_w]
    boxes = x.boxes - np.array([left, top, left, top], dtype=np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, image.shape[1])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, image.shape[0])
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    masks = x.masks[valid][:, top:top + crop_h, left:left + crop_w]
    return Instances(np.ascontiguousarray(image), boxes[valid], x.labels[valid], np.ascontiguousarray(masks))


def multiscale_crop(x: Instances, gen: torch.Generator) -> Instances:
    """The official ``AutoAugment`` of two equally likely policies: (a) resize to one of ``MULTI_SCALES``;
    (b) resize to one of ``CROP_PRE_SCALES``, ``random_crop(CROP_RANGE)``, resize to one of ``MULTI_SCALES``."""
    if _randint(0, 2, gen) == 0:
        return resize(x, MULTI_SCALES[_randint(0, len(MULTI_SCALES), gen)])
    x = resize(x, CROP_PRE_SCALES[_randint(0, len(CROP_PRE_SCALES), gen)])
    x = random_crop(x, CROP_RANGE, gen)
    return resize(x, MULTI_SCALES[_randint(0, len(MULTI_SCALES), gen)])
