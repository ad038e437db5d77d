"""Box utilities with mmdet 2.28's test-time rules: unrounded fixed-stride anchors, DeltaXYWH
decoding with symmetric clamps, and mmcv's batched-NMS rule. Built on ``torchvision.ops.nms``."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import nms

from ..devices import constant

MAX_RATIO = abs(math.log(16 / 1000))  # mmdet wh_ratio_clip = 16/1000
MMCV_NMS_SPLIT = 10000  # mmcv batched_nms: offset trick below this many boxes, per-class loop above
BBOX_STDS = (0.1, 0.1, 0.2, 0.2)  # the RoI box coder's target stds (the RPN's are 1)


def base_anchors(stride: int, scales: tuple[float, ...] = (8.0,), ratios: tuple[float, ...] = (0.5, 1.0, 2.0)) -> Tensor:
    """``[A, 4]`` anchors centred at (0, 0), ratio-major, no rounding (mmdet AnchorGenerator)."""
    ratios_t = torch.tensor(ratios, dtype=torch.float32)
    scales_t = torch.tensor(scales, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios_t)
    w_ratios = 1 / h_ratios
    ws = (stride * w_ratios[:, None] * scales_t[None, :]).reshape(-1)
    hs = (stride * h_ratios[:, None] * scales_t[None, :]).reshape(-1)
    return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], -1)


def grid_anchors(base: Tensor, feat_size: tuple[int, int], stride: int, device: torch.device | str = "cpu") -> Tensor:
    """``[h*w*A, 4]`` anchors of one level, ordered (y, x, anchor); cell (x, y) centred at (x*stride, y*stride)."""
    h, w = feat_size
    shift_x = torch.arange(w, device=device).to(torch.float32) * stride
    shift_y = torch.arange(h, device=device).to(torch.float32) * stride
    xx = shift_x.repeat(h)
    yy = shift_y.view(-1, 1).repeat(1, w).view(-1)
    shifts = torch.stack([xx, yy, xx, yy], -1)
    return (constant(base.tolist(), torch.float32, device)[None] + shifts[:, None]).view(-1, 4)


def decode(rois: Tensor, deltas: Tensor, stds: tuple[float, ...], max_shape: tuple[int, int]) -> Tensor:
    """mmdet ``delta2bbox``: ``rois [n, 4]``, ``deltas [n, 4k]`` -> ``[n, 4k]`` clipped to ``max_shape`` (h, w)."""
    n = deltas.shape[0]
    if n == 0:
        return deltas
    k = deltas.shape[1] // 4
    d = deltas.reshape(-1, 4) * constant(stds, deltas.dtype, deltas.device).view(1, 4)
    r = rois.repeat(1, k).reshape(-1, 4)
    pxy = (r[:, :2] + r[:, 2:]) * 0.5
    pwh = r[:, 2:] - r[:, :2]
    gxy = pxy + pwh * d[:, :2]
    gwh = pwh * d[:, 2:].clamp(min=-MAX_RATIO, max=MAX_RATIO).exp()
    boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], -1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=max_shape[1])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=max_shape[0])
    return boxes.reshape(n, -1)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou: float) -> Tensor:
    """mmcv ``batched_nms``: NMS within each ``idxs`` class. Below 10000 boxes, boxes are offset by
    ``idx * (max + 1)`` and one NMS runs; above, one NMS per class. Returns kept indices by
    descending score."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    if boxes.shape[0] < MMCV_NMS_SPLIT:
        offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
        return nms(boxes + offsets[:, None], scores, iou)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for cls in torch.unique(idxs):
        rows = (idxs == cls).nonzero().view(-1)
        keep_mask[rows[nms(boxes[rows], scores[rows], iou)]] = True
    keep = keep_mask.nonzero().view(-1)
    return keep[scores[keep].argsort(descending=True)]
