"""Detector inference: the batch step (an uploaded batch -> one row per image with its boxes, scores,
labels, RLE masks and the tokens each block kept; skipped images with their reason) and its counts."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd
import torch

from ..data.coco import upload_detection_batch
from ..detection.detector import Detections, MaskRCNNDetector


@dataclass
class DetectorCounts:
    """What a detector run counts: summed per batch, then over the processes (``Job.run``)."""

    images: int = 0  # detected by this process in this run
    seen: int = 0  # detected or skipped
    detections: int = 0
    elapsed: float = 0.0
    model_seconds: float = 0.0  # whole network (FPS^w), this process, this run
    backbone_seconds: float = 0.0  # backbone only (FPS^b)
    retried: list[int] = field(default_factory=list)  # batches that took more attempts (``run_batches``)

    def add(self, other: "DetectorCounts") -> None:
        for name in ("images", "seen", "detections", "model_seconds", "backbone_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


DETECTION_COLUMNS = ("boxes", "scores", "labels", "names", "masks_rle")


def detection_columns(d: Detections | None) -> dict:
    """One image's detections as list columns: ``boxes`` xyxy in original pixels (4 decimals), ``scores``,
    ``labels`` 0..K-1, ``names``, ``masks_rle`` (COCO RLE as JSON text; empty without masks). None: no
    detections (a skipped image)."""
    if d is None:
        return {name: [] for name in DETECTION_COLUMNS}
    masks = d.masks if isinstance(d.masks, list) else []
    return {"boxes": [[round(v, 4) for v in b] for b in d.boxes.tolist()], "scores": [float(s) for s in d.scores.tolist()],
            "labels": [int(v) for v in d.labels.tolist()], "names": list(d.names),
            "masks_rle": [json.dumps(m) for m in masks if m is not None]}


@dataclass
class DetectorStep:
    """The detector's ``BatchStep``. ``masks``: RLE masks in the rows; ``on_batch(batch, detections)``:
    runs before the rows are made (pictures; the detections then carry token maps)."""

    model: MaskRCNNDetector | None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    masks: bool = True
    on_batch: Callable[[dict, list[Detections]], None] | None = None

    def counts(self) -> DetectorCounts:
        return DetectorCounts()

    def bind(self, model: MaskRCNNDetector, device: torch.device, reference: None = None) -> "DetectorStep":
        """``reference``: always None (a detector reports no decision agreement; ``ModelSpec`` refuses one)."""
        return dataclasses.replace(self, model=model, device=torch.device(device))

    def detached(self) -> "DetectorStep":
        return dataclasses.replace(self, model=None, on_batch=None)

    def prepare(self, batch: dict) -> dict:
        """``collate_detection``'s batch -> ``inputs`` on the device (one upload)."""
        return upload_detection_batch(batch, self.device)

    def run(self, batch: dict) -> tuple[pd.DataFrame, DetectorCounts]:
        """An uploaded batch -> its rows and its counts (times: the model's own)."""
        dets: list[Detections] = []
        counts = DetectorCounts(seen=len(batch["all_index"]))
        if batch["inputs"]:
            timer: dict = {}
            dets = self.model.predict_preprocessed(batch["inputs"], batch["metas"], "rle" if self.masks else None,
                                                  timer=timer, token_maps=self.on_batch is not None)
            counts.model_seconds, counts.backbone_seconds = timer["total"], timer["backbone"]
            counts.images = len(dets)
            counts.detections = sum(len(d.scores) for d in dets)
            if self.on_batch is not None:
                self.on_batch(batch, dets)
        return self.rows(batch, dets), counts

    def rows(self, batch: dict, dets: list[Detections]) -> pd.DataFrame:
        """One row per image of ``batch``: status, sizes, tokens per block, its detections as list
        columns (``detection_columns``)."""
        depth = self.model.config.vit.depth
        rows = []
        for idx, image_id, name, meta, d in zip(batch["index"], batch["image_id"], batch["id"], batch["metas"], dets):
            row = {"index": idx, "id": name, "image_id": int(image_id), "status": "ok", "error": "",
                   "height": meta.ori_shape[0], "width": meta.ori_shape[1], "num_detections": len(d.scores),
                   "total_tokens": d.total}
            row.update({f"kept_b{b}": int(d.kept[b]) for b in range(depth)})
            row.update(detection_columns(d))
            rows.append(row)
        for idx, name, image_id, error in batch["failed"]:
            rows.append({"index": idx, "id": name, "image_id": int(image_id), "status": "skipped", "error": error,
                         "num_detections": 0, **detection_columns(None)})
        return pd.DataFrame(rows)
