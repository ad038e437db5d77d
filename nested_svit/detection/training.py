"""The detector's training forward: Mask R-CNN losses (``losses.py``) plus, for SViT, the keep-ratio
loss of the gates in masked execution (straight-through Gumbel masks, ``M * block(x) + (1 - M) * x``,
pruned keys masked). Images of different sizes run together, each at its own padded size."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..losses import keep_ratio_loss
from ..stack import TokenUsage
from .detector import MaskRCNNDetector
from .losses import mask_loss, rcnn_losses, rpn_losses, sample_rois
from .rpn import RPNTestConfig

RPN_TRAIN = RPNTestConfig(nms_pre=2000, max_per_img=1000, iou=0.7, min_bbox_size=0.0)  # mmdet train_cfg.rpn_proposal


def detector_losses(det: MaskRCNNDetector, inputs: Sequence[Tensor], targets: Sequence[dict],
                    ratio_loss: str = "dynamic", ratio_weight: float = 4.0) -> tuple[dict[str, Tensor], TokenUsage]:
    """``inputs``: normalised padded ``[3, H_i, W_i]``; ``targets[i]``: ``boxes [m, 4]`` (padded-input
    pixels), ``labels [m]`` (0..K-1), optional ``masks`` bool ``[m, H_i, W_i]``, optional
    ``img_shape`` (h, w) of the unpadded image (proposals are clipped to it; default: the padded size).
    -> (named losses, their sum under ``"loss"``; token usage)."""
    feats, usage, groups = det.forward_backbone(list(inputs))
    pyramids = det.forward_neck(feats)
    scores, deltas, anchors, shapes = [], [], [], []
    for pyramid, g in zip(pyramids, groups):
        lvl_scores, lvl_deltas = det.rpn_head(pyramid)
        lvl_anchors = det.rpn_head.anchors([tuple(p.shape[-2:]) for p in pyramid], pyramid[0].device)
        for j in range(g.count):
            scores.append(torch.cat([s[j].permute(1, 2, 0).reshape(-1) for s in lvl_scores]))
            deltas.append(torch.cat([d[j].permute(1, 2, 0).reshape(-1, 4) for d in lvl_deltas]))
            anchors.append(torch.cat(lvl_anchors))
            shapes.append(([s[j].detach() for s in lvl_scores], [d[j].detach() for d in lvl_deltas], lvl_anchors))
    gt_boxes = [t["boxes"].to(scores[0].dtype) for t in targets]
    losses = rpn_losses(scores, deltas, anchors, gt_boxes)
    samples = []
    with torch.no_grad():
        for (s, d, a), t, inp in zip(shapes, targets, inputs):
            img_shape = tuple(t.get("img_shape", inp.shape[-2:]))
            proposals = det.rpn_head.proposals(s, d, a, img_shape, RPN_TRAIN)
            samples.append(sample_rois(proposals, t["boxes"].to(proposals.dtype), t["labels"], det.config.num_classes))
    x = det._roi_features(pyramids, groups, [s.boxes for s in samples], 7)
    logits, box_deltas = det.roi_head.bbox_head(x)
    losses.update(rcnn_losses(logits, box_deltas, samples, gt_boxes))
    if all(t.get("masks") is not None for t in targets):
        x = det._roi_features(pyramids, groups, [s.boxes[:s.num_pos] for s in samples], 14)
        mask_logits = det.roi_head.mask_head(x) if x.shape[0] else x.new_zeros(0, det.config.num_classes, 28, 28)
        losses["loss_mask"] = mask_loss(mask_logits, samples, [t["masks"] for t in targets])
    if det.config.vit.method == "svit" and det.backbone.num_gates and usage.masks:
        losses["loss_ratio"] = ratio_weight * keep_ratio_loss(usage, det.config.vit.keep_targets, ratio_loss)
    losses["loss"] = sum(losses.values())
    return losses, usage
