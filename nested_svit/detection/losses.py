"""Training targets of mmdet 2.28's Mask R-CNN (``mask_rcnn_r50_fpn`` defaults), shared by the heads'
losses (``RPNHead.loss``, ``BBoxHead.loss``, ``MaskHead.loss``): max-IoU assignment (RPN 0.7 / 0.3 with
low-quality matches >= 0.3; RoI 0.5), random sampling (RPN 256 at 0.5 positive; RoI 512 at 0.25, ground
truth added as proposals; torchvision's ``BalancedPositiveNegativeSampler``, the same rule), DeltaXYWH
targets, and 28x28 mask targets cut from the ground-truth masks with ``roi_align`` and binarised at 0.5.

Targets per image (in the coordinates of the padded network input): ``boxes [m, 4]`` xyxy,
``labels [m]`` 0..K-1, ``masks`` bool ``[m, H_pad, W_pad]`` (or None: no mask loss).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.ops import box_iou, roi_align

from .boxes import BBOX_STDS  # noqa: F401 (the RoI targets' stds)



@dataclass(frozen=True)
class AssignConfig:
    pos_iou: float
    neg_iou: float
    min_pos_iou: float
    match_low_quality: bool


RPN_ASSIGN = AssignConfig(0.7, 0.3, 0.3, True)
RCNN_ASSIGN = AssignConfig(0.5, 0.5, 0.5, False)


def assign(boxes: Tensor, gt: Tensor, cfg: AssignConfig) -> Tensor:
    """mmdet ``MaxIoUAssigner``: ``[n]`` int64, 0 = negative, -1 = ignored, k >= 1 = ground truth k-1.
    Low-quality matches: every box whose IoU equals a ground truth's best IoU (>= ``min_pos_iou``) is
    assigned to it, later ground truths winning ties."""
    n = boxes.shape[0]
    if gt.shape[0] == 0:
        return torch.zeros(n, dtype=torch.int64, device=boxes.device)
    overlaps = box_iou(gt, boxes)  # [m, n]
    assigned = torch.full((n,), -1, dtype=torch.int64, device=boxes.device)
    if n == 0:
        return assigned
    max_iou, argmax = overlaps.max(0)
    gt_max, _ = overlaps.max(1)
    assigned[(max_iou >= 0) & (max_iou < cfg.neg_iou)] = 0
    pos = max_iou >= cfg.pos_iou
    assigned[pos] = argmax[pos] + 1
    if cfg.match_low_quality:
        for i in range(gt.shape[0]):
            if gt_max[i] >= cfg.min_pos_iou:
                assigned[overlaps[i] == gt_max[i]] = i + 1
    return assigned


def encode(boxes: Tensor, gt: Tensor, stds: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """mmdet ``bbox2delta`` (means 0): the deltas that ``boxes.decode`` maps ``boxes`` back to ``gt``."""
    pxy, pwh = (boxes[:, :2] + boxes[:, 2:]) * 0.5, boxes[:, 2:] - boxes[:, :2]
    gxy, gwh = (gt[:, :2] + gt[:, 2:]) * 0.5, gt[:, 2:] - gt[:, :2]
    deltas = torch.cat([(gxy - pxy) / pwh, torch.log(gwh / pwh)], 1)
    return deltas / deltas.new_tensor(stds)


def sample(assigned: Tensor, num: int, pos_fraction: float) -> tuple[Tensor, Tensor]:
    """Indices of sampled positives and negatives (torchvision's sampler = mmdet's RandomSampler)."""
    labels = torch.where(assigned > 0, 1, torch.where(assigned == 0, 0, -1))
    pos_mask, neg_mask = BalancedPositiveNegativeSampler(num, pos_fraction)([labels])
    return pos_mask[0].nonzero().view(-1), neg_mask[0].nonzero().view(-1)


@dataclass
class RoISamples:
    """Sampled RoIs of one image: boxes ``[r, 4]``, class labels (K = background), matched gt index."""

    boxes: Tensor
    labels: Tensor
    gt_index: Tensor
    num_pos: int


def sample_rois(proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int) -> RoISamples:
    """mmdet RoI sampling: ground truth added as proposals, assigned at IoU 0.5, 512 sampled at 0.25."""
    boxes = torch.cat([gt_boxes, proposals[:, :4].detach()])
    assigned = assign(boxes, gt_boxes, RCNN_ASSIGN)
    pos, neg = sample(assigned, 512, 0.25)
    idx = torch.cat([pos, neg])
    gt_index = torch.cat([assigned[pos] - 1, torch.full_like(neg, -1)])
    labels = torch.cat([gt_labels[assigned[pos] - 1], torch.full_like(neg, num_classes)])
    return RoISamples(boxes[idx], labels, gt_index, pos.numel())


def mask_targets(samples: list[RoISamples], gt_masks: list[Tensor], size: int = 28) -> Tensor:
    """Positive RoIs' ``[P, size, size]`` {0, 1} targets: the matched ground-truth mask cut by the RoI
    with ``roi_align`` (aligned, adaptive sampling), binarised at 0.5 (mmdet ``BitmapMasks.crop_and_resize``)."""
    out = []
    for s, masks in zip(samples, gt_masks):
        if s.num_pos == 0:
            continue
        src = masks[s.gt_index[:s.num_pos]].float()[:, None]  # [P, 1, H, W]
        rois = torch.cat([torch.arange(s.num_pos, device=src.device, dtype=src.dtype)[:, None],
                          s.boxes[:s.num_pos].to(src.dtype)], 1)
        out.append((roi_align(src, rois, (size, size), 1.0, sampling_ratio=0, aligned=True)[:, 0] >= 0.5).float())
    return torch.cat(out) if out else gt_masks[0].new_zeros(0, size, size, dtype=torch.float32)
