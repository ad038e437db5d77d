"""RPN head, its proposals (mmdet 2.28 ``RPNHead``: 1 sigmoid logit per anchor, 3 anchors per location,
per-level top-1000 at test time, level-batched NMS at IoU 0.7, 1000 proposals) and its training loss
(BCE + L1 over 256 sampled anchors per image, averaged over the batch's sampled anchors)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .boxes import base_anchors, batched_nms, decode, grid_anchors
from .losses import RPN_ASSIGN, assign, encode, sample

STRIDES = (4, 8, 16, 32, 64)


@dataclass(frozen=True)
class RPNTestConfig:
    nms_pre: int = 1000
    max_per_img: int = 1000
    iou: float = 0.7
    min_bbox_size: float = 0.0


RPN_TRAIN = RPNTestConfig(nms_pre=2000, max_per_img=1000, iou=0.7, min_bbox_size=0.0)  # mmdet train_cfg.rpn_proposal


class RPNHead(nn.Module):
    def __init__(self, channels: int = 256, num_anchors: int = 3):
        super().__init__()
        self.rpn_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(channels, num_anchors * 4, 1)
        for m in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        self._base = [base_anchors(s) for s in STRIDES]

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: logits ``[G, A, h, w]`` and deltas ``[G, 4A, h, w]``."""
        scores, deltas = [], []
        for f in feats:
            t = F.relu(self.rpn_conv(f), inplace=True)
            scores.append(self.rpn_cls(t))
            deltas.append(self.rpn_reg(t))
        return scores, deltas

    def anchors(self, feat_sizes: list[tuple[int, int]], device: torch.device) -> list[Tensor]:
        """Per level ``[h*w*A, 4]`` anchors of a padded image whose maps have ``feat_sizes``."""
        return [grid_anchors(b, s, st, device) for b, s, st in zip(self._base, feat_sizes, STRIDES)]

    def proposals(self, scores: list[Tensor], deltas: list[Tensor], anchors: list[Tensor],
                  img_shape: tuple[int, int], cfg: RPNTestConfig) -> Tensor:
        """One image: per-level ``[A, h, w]`` logits and ``[4A, h, w]`` deltas -> ``[n, 5]`` (box, score)."""
        lvl_scores, lvl_deltas, lvl_anchors, lvl_ids = [], [], [], []
        for lvl, (s, d, a) in enumerate(zip(scores, deltas, anchors)):  # box arithmetic in fp32 at any precision
            s = s.permute(1, 2, 0).reshape(-1).float().sigmoid()
            d = d.permute(1, 2, 0).reshape(-1, 4).float()
            if 0 < cfg.nms_pre < s.shape[0]:
                s, order = s.sort(descending=True)
                top = order[:cfg.nms_pre]
                s, d, a = s[:cfg.nms_pre], d[top], a[top]
            lvl_scores.append(s)
            lvl_deltas.append(d)
            lvl_anchors.append(a)
            lvl_ids.append(torch.full((s.shape[0],), lvl, dtype=torch.int64, device=s.device))
        s = torch.cat(lvl_scores)
        boxes = decode(torch.cat(lvl_anchors), torch.cat(lvl_deltas), (1.0, 1.0, 1.0, 1.0), img_shape)
        ids = torch.cat(lvl_ids)
        if cfg.min_bbox_size >= 0:
            valid = ((boxes[:, 2] - boxes[:, 0]) > cfg.min_bbox_size) & ((boxes[:, 3] - boxes[:, 1]) > cfg.min_bbox_size)
            if not bool(valid.all()):
                boxes, s, ids = boxes[valid], s[valid], ids[valid]
        if boxes.numel() == 0:
            return boxes.new_zeros(0, 5)
        keep = batched_nms(boxes, s, ids, cfg.iou)[:cfg.max_per_img]
        return torch.cat([boxes[keep], s[keep, None]], 1)

    @staticmethod
    def loss(scores: list[Tensor], deltas: list[Tensor], anchors: list[Tensor], gt_boxes: list[Tensor]
             ) -> dict[str, Tensor]:
        """Per image: ``scores[i]`` ``[N_anchors]`` logits and ``deltas[i]`` ``[N_anchors, 4]`` (all levels,
        (y, x, anchor) order), ``anchors[i]`` ``[N_anchors, 4]``; -> ``loss_rpn_cls``, ``loss_rpn_bbox``."""
        cls_terms, box_terms, samples = [], [], 0
        for s, d, a, gt in zip(scores, deltas, anchors, gt_boxes):
            assigned = assign(a, gt, RPN_ASSIGN)
            pos, neg = sample(assigned, 256, 0.5)
            idx = torch.cat([pos, neg])
            target = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).to(s.dtype)
            cls_terms.append(F.binary_cross_entropy_with_logits(s[idx], target, reduction="sum"))
            if pos.numel():
                box_terms.append((d[pos] - encode(a[pos], gt[assigned[pos] - 1])).abs().sum())
            samples += idx.numel()
        norm = max(samples, 1)
        zero = scores[0].sum() * 0
        return {"loss_rpn_cls": sum(cls_terms, zero) / norm, "loss_rpn_bbox": sum(box_terms, zero) / norm}
