"""Mask R-CNN with a (gated) ViT-Adapter backbone, batched over images of different sizes.

``predict(images)`` = ``preprocess`` (each image resized and padded on its own) -> images sorted by
padded size (stable) -> ``forward_backbone`` (one packed token set for the ViT, per-size-group
spatial layers) -> FPN and RPN per size group -> proposals per image -> RoI features per size group,
box and mask heads on the RoIs of all images at once -> per-image post-processing -> results in the
caller's order. Nothing about an image depends on the other images of its batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.profiler import record_function

from ..data.det_transforms import ImageMeta, preprocess, read_image
from ..devices import synchronize
from ..stack import TokenUsage
from .adapter import SizeGroup, ViTAdapter, size_groups
from .classes import COCO_CLASSES
from .config import DetectorConfig
from .losses import sample_rois
from .neck import FPN
from .roi_heads import BBoxHead, MaskHead, paste_masks, roi_features
from .rpn import RPN_TRAIN, RPNHead

ImageInput = np.ndarray | Tensor | str | os.PathLike


@dataclass
class Detections:
    """One image's detections in original pixels. boxes ``[n, 4]`` xyxy float32, scores ``[n]``,
    labels ``[n]`` int64 (0..K-1), names, masks: bool ``[n, H, W]`` or a list of COCO RLE dicts, or
    None; kept: ``[depth]`` tokens each ViT block processed; total: tokens of the image."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str]
    masks: Tensor | list[dict] | None
    kept: Tensor
    total: int
    meta: ImageMeta | None = None
    token_maps: Tensor | None = None  # bool [num_gates, h/16, w/16] over the padded input, when asked for


class RoIHead(nn.Module):
    def __init__(self, num_classes: int, channels: int):
        super().__init__()
        self.bbox_head = BBoxHead(num_classes, channels)
        self.mask_head = MaskHead(num_classes, channels)


class MaskRCNNDetector(nn.Module):
    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.config = config
        self.name = "custom"
        self.backbone = ViTAdapter(config.vit, config.adapter)
        self.neck = FPN(config.vit.embed_dim, config.fpn_channels)
        self.rpn_head = RPNHead(config.fpn_channels)
        self.roi_head = RoIHead(config.num_classes, config.fpn_channels)

    @property
    def class_names(self) -> tuple[str, ...]:
        if self.config.class_names:
            return self.config.class_names
        if self.config.num_classes == len(COCO_CLASSES):
            return COCO_CLASSES
        return tuple(f"class_{i}" for i in range(self.config.num_classes))

    def checkpoint_meta(self) -> dict:
        """What a file of this detector records besides its weights (``checkpoint.model_payload``); its
        class names travel in the config."""
        return {"kind": "detector", "model_name": self.name, "model_config": self.config.to_dict(),
                "block_norm_eps": self.backbone.block_norm_eps}

    def set_execution(self, mode: str, backend: str | None = None, compile: bool | None = None,
                      capacity: float | None = None) -> "MaskRCNNDetector":
        """The backbone's execution (``TokenStack.set_execution``); the capacity forward is for classifiers
        (an overflowed forward would have to rerun the whole detector)."""
        if capacity:
            raise ValueError("the capacity forward runs classifiers only; a detector runs the exact forward")
        self.backbone.set_execution(mode, backend, compile)
        return self

    @torch.no_grad()
    def calibrate_keep(self, images: Sequence[ImageInput], targets: Sequence[float] | None = None) -> list[float]:
        """Shift gate thresholds so the batch-average keep fractions on ``images`` hit ``targets``."""
        inputs, _ = self.preprocess(images)
        return self.backbone.calibrate_keep(inputs, targets)

    # ------------------------------------------------------------------ steps
    def preprocess(self, images: Sequence[ImageInput]) -> tuple[list[Tensor], list[ImageMeta]]:
        """RGB uint8 arrays/tensors or file paths -> normalised padded ``[3, H_i, W_i]`` and metas.
        Grayscale, RGBA, 16-bit and float (0..1) arrays are converted as image files are."""
        _check_image_list(images)
        inputs, metas = [], []
        for i, img in enumerate(images):
            if isinstance(img, (str, os.PathLike)):
                img = read_image(img)
            try:
                t, meta = preprocess(img, self.config.img_scale)
            except ValueError as e:
                raise ValueError(f"image {i}: {e}") from None
            inputs.append(t)
            metas.append(meta)
        return inputs, metas

    def forward_backbone(self, inputs: Sequence[Tensor]) -> tuple[list[list[Tensor]], TokenUsage, list[SizeGroup]]:
        """Padded inputs (consecutive equal sizes are batched) -> per size group the 4 backbone maps
        ``[G, C, h/4 .. h/32]``, token usage per image, and the groups."""
        dtype = self.backbone.dtype
        inputs = [t.to(dtype) for t in inputs]
        with record_function("backbone"):
            feats, usage = self.backbone.forward_features(inputs)
        groups = size_groups([tuple(t.shape[-2:]) for t in inputs], self.backbone.group_by)
        return feats, usage, groups

    def forward_neck(self, feats: list[list[Tensor]]) -> list[list[Tensor]]:
        with record_function("neck"):
            return [self.neck(f) for f in feats]

    def proposals(self, pyramids: list[list[Tensor]], groups: list[SizeGroup], metas: list[ImageMeta]) -> list[Tensor]:
        """Per image ``[n, 5]`` proposals (box in resized pixels, score)."""
        out = []
        with record_function("rpn"):
            for pyramid, g in zip(pyramids, groups):
                scores, deltas = self.rpn_head(pyramid)
                anchors = self.rpn_head.anchors([tuple(p.shape[-2:]) for p in pyramid], pyramid[0].device)
                for j in range(g.count):
                    meta = metas[g.start + j]
                    out.append(self.rpn_head.proposals([s[j] for s in scores], [d[j] for d in deltas], anchors,
                                                       meta.img_shape[:2], self.config.rpn))
        return out

    def _roi_features(self, pyramids: list[list[Tensor]], groups: list[SizeGroup], boxes: list[Tensor],
                      size: int) -> Tensor:
        """Per-image boxes (padded-input pixels) -> RoI features of all images, image-major."""
        feats = []
        for pyramid, g in zip(pyramids, groups):
            rois = [torch.cat([b.new_full((b.shape[0], 1), j), b[:, :4]], 1)
                    for j, b in enumerate(boxes[g.start:g.start + g.count])]
            feats.append(roi_features(pyramid[:4], torch.cat(rois), size))
        return torch.cat(feats)

    def detect(self, pyramids: list[list[Tensor]], groups: list[SizeGroup], metas: list[ImageMeta],
               proposals: list[Tensor], with_masks: bool = True) -> list[tuple[Tensor, Tensor, Tensor, Tensor | None]]:
        """Per image (boxes in original pixels, scores, labels, bool masks ``[n, H0, W0]`` or None)."""
        cfg = self.config.rcnn
        with record_function("roi_bbox"):
            x = self._roi_features(pyramids, groups, proposals, 7)
            logits, deltas = self.roi_head.bbox_head(x)
            counts = [p.shape[0] for p in proposals]
            dets = [self.roi_head.bbox_head.detections(p[:, :4], lg, dl, m.img_shape[:2], m.scale_tensor(p.device), cfg)
                    for p, lg, dl, m in zip(proposals, logits.split(counts), deltas.split(counts), metas)]
        if not with_masks:
            return [(b, s, lab, None) for b, s, lab in dets]
        with record_function("roi_mask"):
            mask_boxes = [b * m.scale_tensor(b.device) for (b, _, _), m in zip(dets, metas)]
            x = self._roi_features(pyramids, groups, mask_boxes, 14)
            mask_logits = self.roi_head.mask_head(x) if x.shape[0] else x.new_zeros(0, self.config.num_classes, 28, 28)
        out = []
        with record_function("mask_paste"):
            for (b, s, lab), mb, logit, m in zip(dets, mask_boxes, mask_logits.split([d[0].shape[0] for d in dets]), metas):
                probs = logit[torch.arange(lab.shape[0], device=lab.device), lab].sigmoid()
                paste_boxes = mb / m.scale_tensor(mb.device)
                out.append((b, s, lab, paste_masks(probs, paste_boxes, m.ori_shape[0], m.ori_shape[1], cfg.mask_thr)))
        return out

    # ------------------------------------------------------------------ training
    def losses(self, inputs: Sequence[Tensor], targets: Sequence[dict], ratio_loss: str = "dynamic",
               ratio_weight: float = 4.0) -> tuple[dict[str, Tensor], TokenUsage]:
        """mmdet's Mask R-CNN training losses, each from its head, plus the pruning method's keep-ratio
        loss (SViT: gates in masked execution, Gumbel masks). ``inputs``: normalised padded
        ``[3, H_i, W_i]``; ``targets[i]``: ``boxes [m, 4]`` (padded-input pixels), ``labels [m]``
        (0..K-1), optional ``masks`` bool ``[m, H_i, W_i]``, optional ``img_shape`` (h, w) of the unpadded
        image (proposals are clipped to it; default: the padded size). -> (named losses, their sum under
        ``"loss"``; token usage). Images of different sizes run together, each at its own padded size."""
        feats, usage, groups = self.forward_backbone(list(inputs))
        pyramids = self.forward_neck(feats)
        scores, deltas, anchors, raw = [], [], [], []
        for pyramid, g in zip(pyramids, groups):
            lvl_scores, lvl_deltas = self.rpn_head(pyramid)
            lvl_anchors = self.rpn_head.anchors([tuple(p.shape[-2:]) for p in pyramid], pyramid[0].device)
            for j in range(g.count):
                scores.append(torch.cat([s[j].permute(1, 2, 0).reshape(-1) for s in lvl_scores]))
                deltas.append(torch.cat([d[j].permute(1, 2, 0).reshape(-1, 4) for d in lvl_deltas]))
                anchors.append(torch.cat(lvl_anchors))
                raw.append(([s[j].detach() for s in lvl_scores], [d[j].detach() for d in lvl_deltas], lvl_anchors))
        gt_boxes = [t["boxes"].float() for t in targets]  # fp32 under autocast too: bf16 would round them
        losses = self.rpn_head.loss(scores, deltas, anchors, gt_boxes)
        samples = []
        with torch.no_grad():
            for (s, d, a), t, inp in zip(raw, targets, inputs):
                img_shape = tuple(t.get("img_shape", inp.shape[-2:]))
                proposals = self.rpn_head.proposals(s, d, a, img_shape, RPN_TRAIN)
                samples.append(sample_rois(proposals.float(), t["boxes"].float(), t["labels"],
                                           self.config.num_classes))
        x = self._roi_features(pyramids, groups, [s.boxes for s in samples], 7)
        logits, box_deltas = self.roi_head.bbox_head(x)
        losses.update(self.roi_head.bbox_head.loss(logits, box_deltas, samples, gt_boxes))
        if all(t.get("masks") is not None for t in targets):
            x = self._roi_features(pyramids, groups, [s.boxes[:s.num_pos] for s in samples], 14)
            mask_logits = self.roi_head.mask_head(x) if x.shape[0] else x.new_zeros(0, self.config.num_classes, 28, 28)
            losses["loss_mask"] = self.roi_head.mask_head.loss(mask_logits, samples, [t["masks"] for t in targets])
        method = self.backbone.method
        if method.ratio_loss is not None and self.backbone.num_gates and usage.masks:
            losses["loss_ratio"] = ratio_weight * method.ratio_loss(usage, self.config.vit.keep_targets, ratio_loss)
        losses["loss"] = sum(losses.values())
        return losses, usage

    def forward(self, inputs: Sequence[Tensor], targets: Sequence[dict] | None = None,
                metas: Sequence[ImageMeta] | None = None, ratio_loss: str = "dynamic", ratio_weight: float = 4.0):
        """One entry for training and inference, as torchvision's detectors: in training mode ``losses``
        (``targets`` required) -> (named losses, token usage); in eval mode ``predict_preprocessed`` of the
        ``inputs`` with their ``metas`` (``preprocess``'s) -> one ``Detections`` per image."""
        if self.training:
            if targets is None:
                raise ValueError("a detector in training mode takes targets (its losses); call .eval() to detect")
            return self.losses(inputs, targets, ratio_loss, ratio_weight)
        if metas is None or len(metas) != len(inputs):
            raise ValueError("detecting takes each input's ImageMeta (model.preprocess returns them)")
        return self.predict_preprocessed(list(inputs), list(metas))

    # ------------------------------------------------------------------ library call
    @torch.no_grad()
    def predict(self, images: Sequence[ImageInput], masks: str | None = "bool", token_maps: bool = False) -> list[Detections]:
        """Images (RGB uint8 ``[H, W, 3]`` arrays or tensors, or file paths) -> one ``Detections`` per
        image, in input order. ``masks``: ``"bool"`` (``[n, H, W]``), ``"rle"`` (COCO RLE dicts) or None.
        ``token_maps``: also return which tokens each gate kept (for pictures)."""
        if masks not in ("bool", "rle", None):
            raise ValueError(f"masks must be 'bool', 'rle' or None, not {masks!r}")
        _check_image_list(images)
        if len(images) == 0:
            return []
        inputs, metas = self.preprocess(images)
        return self.predict_preprocessed(inputs, metas, masks, token_maps=token_maps)

    @torch.no_grad()
    def predict_preprocessed(self, inputs: list[Tensor], metas: list[ImageMeta], masks: str | None = "bool",
                             backbone_only: bool = False, timer: dict | None = None,
                             token_maps: bool = False) -> list[Detections]:
        """Like ``predict`` on already preprocessed inputs. ``backbone_only``: stop after the backbone
        (FPS^b timing); the results then hold usage only. ``timer``: seconds are added to its
        ``"backbone"`` and ``"total"`` entries (device-synchronised; input upload included)."""
        device = self.backbone.pos_embed.device
        start = _now(device)
        order = sorted(range(len(inputs)), key=lambda i: (inputs[i].shape[-2], inputs[i].shape[-1]))
        s_inputs = [inputs[i].to(device) for i in order]
        s_metas = [metas[i] for i in order]
        feats, usage, groups = self.forward_backbone(s_inputs)
        if timer is not None:
            timer["backbone"] = timer.get("backbone", 0.0) + _now(device) - start
        if backbone_only:
            results = [self._empty(usage, j, s_metas[j]) for j in range(len(order))]
        else:
            pyramids = self.forward_neck(feats)
            props = self.proposals(pyramids, groups, s_metas)
            dets = self.detect(pyramids, groups, s_metas, props, with_masks=masks is not None)
            results = [self._result(d, usage, j, s_metas[j], masks) for j, d in enumerate(dets)]
        if timer is not None:
            timer["total"] = timer.get("total", 0.0) + _now(device) - start
        if token_maps:
            self._attach_token_maps(results, usage, s_inputs)
        out: list[Detections] = [None] * len(order)  # type: ignore[list-item]
        for j, i in enumerate(order):
            out[i] = results[j]
        return out

    @staticmethod
    def _attach_token_maps(results: list[Detections], usage: TokenUsage, inputs: list[Tensor]) -> None:
        start = 0
        for r, t in zip(results, inputs):
            h, w = t.shape[-2] // 16, t.shape[-1] // 16
            maps = [m[start:start + h * w].bool().view(h, w).cpu() for m in usage.masks]
            r.token_maps = torch.stack(maps) if maps else torch.zeros(0, h, w, dtype=torch.bool)
            start += h * w

    def _empty(self, usage: TokenUsage, j: int, meta: ImageMeta) -> Detections:
        z = torch.zeros(0)
        kept = usage.kept_after_selection[j].clone()
        return Detections(z.view(0, 4), z, z.long(), [], None, kept, int(usage.total[j]), meta)

    def _result(self, det, usage: TokenUsage, j: int, meta: ImageMeta, masks: str | None) -> Detections:
        boxes, scores, labels, bool_masks = (t.cpu() if t is not None else None for t in det)
        names = [self.class_names[int(k)] for k in labels]
        mask_out: Tensor | list[dict] | None = bool_masks
        if masks == "rle" and bool_masks is not None:
            from .rle import encode_masks

            mask_out = encode_masks(bool_masks)
        return Detections(boxes.float(), scores.float(), labels, names, mask_out, usage.kept_after_selection[j].clone(),
                          int(usage.total[j]), meta)


def _check_image_list(images) -> None:
    """``predict`` / ``preprocess`` take a list: one image alone (a path string would be iterated
    character by character) or None is refused with what to pass."""
    if images is None:
        raise ValueError("predict takes a list of images (file paths or RGB uint8 arrays [H, W, 3]), got None")
    if isinstance(images, (str, os.PathLike, np.ndarray, Tensor)):
        raise ValueError("predict takes a list of images: wrap one image in a list, predict([image])")


def _now(device: torch.device) -> float:
    """Wall clock after the device has finished its queued work."""
    import time

    synchronize(device)
    return time.perf_counter()
