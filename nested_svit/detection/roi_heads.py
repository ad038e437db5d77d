"""RoI heads of mmdet 2.28's Mask R-CNN: mmdet's level mapping, ``roi_align`` (aligned, adaptive
sampling), Shared2FC box head (background = last class), class-wise NMS after rescaling to original
pixels, FCN mask head and grid-sample mask pasting; each head's training loss beside its predictions
(box: CE + L1 on class-specific deltas over the batch's sampled RoIs; mask: per-pixel BCE on the positive
RoIs' class channel). Parameter names as mmdet (``bbox_head.shared_fcs.{i}``, ``fc_cls``, ``fc_reg``,
``mask_head.convs.{i}.conv``, ``upsample``, ``conv_logits``)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from .boxes import BBOX_STDS, batched_nms, decode
from .losses import RoISamples, encode, mask_targets
from .neck import ConvModule

ROI_STRIDES = (4, 8, 16, 32)
FINEST_SCALE = 56


@dataclass(frozen=True)
class RCNNTestConfig:
    score_thr: float = 0.05
    iou: float = 0.5
    max_per_img: int = 100
    mask_thr: float = 0.5


def map_roi_levels(rois: Tensor, levels: int = 4) -> Tensor:
    """mmdet ``SingleRoIExtractor.map_roi_levels``: ``floor(log2(sqrt(wh)/56 + 1e-6))`` in [0, levels-1]."""
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    return torch.floor(torch.log2(scale / FINEST_SCALE + 1e-6)).clamp(min=0, max=levels - 1).long()


_POOL: ThreadPoolExecutor | None = None
PARALLEL_MIN_ROIS = 64


def _roi_align(feat: Tensor, rois: Tensor, size: int, scale: float) -> Tensor:
    """torchvision ``roi_align`` (aligned, adaptive sampling). Its CPU kernel runs on one thread and
    releases the GIL, so on CPU the RoIs are split over ``torch.get_num_threads()`` Python threads
    (each RoI is computed independently: results are identical; 2x faster on 2 cores)."""
    threads = torch.get_num_threads()
    if feat.device.type != "cpu" or threads < 2 or rois.shape[0] < PARALLEL_MIN_ROIS:
        return roi_align(feat, rois, (size, size), scale, sampling_ratio=0, aligned=True)
    global _POOL
    if _POOL is None or _POOL._max_workers != threads:
        _POOL = ThreadPoolExecutor(threads, thread_name_prefix="roi_align")
    parts = list(_POOL.map(lambda r: roi_align(feat, r, (size, size), scale, sampling_ratio=0, aligned=True),
                           rois.chunk(threads)))
    return torch.cat(parts)


def roi_features(feats: list[Tensor], rois: Tensor, size: int) -> Tensor:
    """``feats``: P2-P5 ``[G, 256, h, w]`` of one size group; ``rois [n, 5]`` (group image index, box
    in padded-input pixels) -> ``[n, 256, size, size]``."""
    out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], size, size)
    if rois.shape[0] == 0:
        return out
    rois = rois.float()  # box coordinates stay fp32; half-precision maps are sampled in fp32
    lvls = map_roi_levels(rois, len(ROI_STRIDES))
    per_level = torch.zeros(len(ROI_STRIDES), dtype=torch.int64, device=rois.device).index_add_(
        0, lvls, torch.ones_like(lvls)).tolist()  # one read sizes every level (no per-level nonzero)
    order = torch.argsort(lvls, stable=True)
    start = 0
    for i, (f, stride, n) in enumerate(zip(feats, ROI_STRIDES, per_level)):
        if n:
            rows = order[start:start + n]
            out[rows] = _roi_align(f.float(), rois[rows], size, 1.0 / stride).to(out.dtype)
            start += n
    return out


class BBoxHead(nn.Module):
    """Shared2FCBBoxHead: ``[n, 256, 7, 7]`` -> class logits ``[n, K+1]`` (background last), deltas ``[n, 4K]``."""

    def __init__(self, num_classes: int, channels: int = 256, roi_size: int = 7, fc: int = 1024):
        super().__init__()
        self.num_classes = num_classes
        self.shared_fcs = nn.ModuleList([nn.Linear(channels * roi_size * roi_size, fc), nn.Linear(fc, fc)])
        self.fc_cls = nn.Linear(fc, num_classes + 1)
        self.fc_reg = nn.Linear(fc, 4 * num_classes)
        for fc_layer in self.shared_fcs:
            nn.init.xavier_uniform_(fc_layer.weight)
            nn.init.zeros_(fc_layer.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        for fc_layer in self.shared_fcs:
            x = F.relu(fc_layer(x), inplace=True)
        return self.fc_cls(x), self.fc_reg(x)

    def detections(self, boxes: Tensor, logits: Tensor, deltas: Tensor, img_shape: tuple[int, int],
                   scale_factor: Tensor, cfg: RCNNTestConfig) -> tuple[Tensor, Tensor, Tensor]:
        """One image's proposals ``[n, 4]`` (resized pixels) -> boxes in original pixels ``[m, 4]``,
        scores ``[m]``, labels ``[m]`` (0..K-1), by descending score (mmdet ``get_bboxes`` with rescale).
        Box arithmetic and NMS in fp32 at any precision."""
        scores = F.softmax(logits.float(), dim=-1)
        decoded = decode(boxes.float(), deltas.float(), BBOX_STDS, img_shape)
        if decoded.shape[0]:
            decoded = (decoded.view(decoded.shape[0], -1, 4) / scale_factor.to(decoded)).view(decoded.shape[0], -1)
        k = scores.shape[1] - 1
        cand_boxes = decoded.view(-1, k, 4).reshape(-1, 4)
        cand_scores = scores[:, :k].reshape(-1)
        labels = torch.arange(k, device=scores.device).view(1, -1).expand(scores.shape[0], k).reshape(-1)
        valid = (cand_scores > cfg.score_thr).nonzero().squeeze(1)
        cand_boxes, cand_scores, labels = cand_boxes[valid], cand_scores[valid], labels[valid]
        if cand_boxes.numel() == 0:
            return cand_boxes.new_zeros(0, 4), cand_scores.new_zeros(0), labels.new_zeros(0)
        keep = batched_nms(cand_boxes, cand_scores, labels, cfg.iou)[:cfg.max_per_img]
        return cand_boxes[keep], cand_scores[keep], labels[keep]

    @staticmethod
    def loss(logits: Tensor, deltas: Tensor, samples: list[RoISamples], gt_boxes: list[Tensor]) -> dict[str, Tensor]:
        """``logits [R, K+1]``, ``deltas [R, 4K]`` for the RoIs of ``samples`` (image-major) -> CE + L1."""
        labels = torch.cat([s.labels for s in samples])
        loss_cls = F.cross_entropy(logits, labels, reduction="sum") / max(labels.numel(), 1)
        start, box_terms = 0, []
        for s, gt in zip(samples, gt_boxes):
            if s.num_pos:
                rows = torch.arange(start, start + s.num_pos, device=logits.device)
                pred = deltas[rows].view(s.num_pos, -1, 4)[torch.arange(s.num_pos, device=logits.device),
                                                           s.labels[:s.num_pos]]
                target = encode(s.boxes[:s.num_pos], gt[s.gt_index[:s.num_pos]], BBOX_STDS)
                box_terms.append((pred - target).abs().sum())
            start += s.boxes.shape[0]
        return {"loss_cls": loss_cls, "loss_bbox": sum(box_terms, logits.sum() * 0) / max(labels.numel(), 1)}


MASK_CHUNK = 32


class MaskHead(nn.Module):
    """FCNMaskHead: 4 x (3x3 conv + ReLU), 2x deconv + ReLU, 1x1 -> ``[n, K, 28, 28]`` logits."""

    def __init__(self, num_classes: int, channels: int = 256):
        super().__init__()
        self.convs = nn.ModuleList(ConvModule(channels, channels, 3, relu=True) for _ in range(4))
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, 2)
        self.conv_logits = nn.Conv2d(channels, num_classes, 1)
        for m in (self.upsample, self.conv_logits):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and not torch.is_grad_enabled() and x.shape[0] > MASK_CHUNK:
            # small chunks keep the 4 convs' working set in cache: 25% faster per RoI on CPU (bench/README.md)
            return torch.cat([self.forward(part) for part in x.split(MASK_CHUNK)])
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(F.relu(self.upsample(x), inplace=True))

    @staticmethod
    def loss(mask_logits: Tensor, samples: list[RoISamples], gt_masks: list[Tensor]) -> Tensor:
        """``mask_logits [P, K, 28, 28]`` of the positive RoIs (image-major) -> mean per-pixel BCE on each
        RoI's class channel."""
        labels = torch.cat([s.labels[:s.num_pos] for s in samples])
        if labels.numel() == 0:
            return mask_logits.sum() * 0
        pred = mask_logits[torch.arange(labels.numel(), device=labels.device), labels]
        return F.binary_cross_entropy_with_logits(pred, mask_targets(samples, gt_masks, pred.shape[-1]))


def paste_masks(probs: Tensor, boxes: Tensor, height: int, width: int, threshold: float) -> Tensor:
    """mmdet ``_do_paste_mask`` on the whole image (its GPU path): each ``[28, 28]`` probability map
    is sampled (``grid_sample``, align_corners=False, zeros) at the centres of original pixels inside
    ``boxes [n, 4]`` (continuous, original pixels) -> bool ``[n, height, width]`` (``>= threshold``).

    Only a window around each box is computed: outside ``box +- box/56`` (half a mask cell) the
    bilinear sample is exactly zero, so the result equals the whole-image computation.
    """
    n = probs.shape[0]
    out = torch.zeros(n, height, width, dtype=torch.bool, device=probs.device)
    cells = probs.shape[-1]
    host_boxes = boxes.tolist()  # one read for every window (not one per detection)
    for i in range(n):
        x0, y0, x1, y1 = host_boxes[i]
        mx, my = (x1 - x0) / (2 * cells) + 1, (y1 - y0) / (2 * cells) + 1
        xa, xb = max(int(x0 - mx), 0), min(int(x1 + mx) + 2, width)
        ya, yb = max(int(y0 - my), 0), min(int(y1 + my) + 2, height)
        if xa >= xb or ya >= yb:
            continue
        img_x = torch.arange(xa, xb, device=probs.device, dtype=torch.float32) + 0.5
        img_y = torch.arange(ya, yb, device=probs.device, dtype=torch.float32) + 0.5
        img_x = (img_x - boxes[i, 0]) / (boxes[i, 2] - boxes[i, 0]) * 2 - 1
        img_y = (img_y - boxes[i, 1]) / (boxes[i, 3] - boxes[i, 1]) * 2 - 1
        img_x = torch.where(torch.isinf(img_x), torch.zeros_like(img_x), img_x)
        img_y = torch.where(torch.isinf(img_y), torch.zeros_like(img_y), img_y)
        grid = torch.stack([img_x[None, :].expand(len(img_y), -1), img_y[:, None].expand(-1, len(img_x))], -1)
        sampled = F.grid_sample(probs[i][None, None].float(), grid[None], align_corners=False)[0, 0]
        out[i, ya:yb, xa:xb] = sampled >= threshold
    return out
