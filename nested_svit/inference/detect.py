"""Detector inference: the batch step (an uploaded batch -> one row per image with its boxes, scores,
labels, RLE masks and the tokens each block kept; skipped images with their reason), its counts, and
the job of a local run (``DetectionJob`` / ``run_detection``)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from ..data.coco import DetectionImages, upload_detection_batch
from ..detection.detector import Detections, MaskRCNNDetector
from ..distributed import DistInfo
from .loop import run_local
from .dataset_out import open_store
from .parts import PartStore


@dataclass
class DetectionProgress:
    images: int = 0  # detected by this process in this run
    seen: int = 0  # detected or skipped
    detections: int = 0
    elapsed: float = 0.0
    model_seconds: float = 0.0  # whole network (FPS^w), this process, this run
    backbone_seconds: float = 0.0  # backbone only (FPS^b)
    retried: list[int] = field(default_factory=list)  # batches that took more attempts (``run_batches``)

    def add(self, other: "DetectionProgress") -> None:
        for name in ("images", "seen", "detections", "model_seconds", "backbone_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _detections_json(d: Detections) -> str:
    boxes = d.boxes.tolist()
    masks = d.masks if isinstance(d.masks, list) else [None] * len(boxes)
    return json.dumps([{"bbox": [round(v, 4) for v in b], "score": float(s), "label": int(lab), "name": n,
                        **({"segmentation": m} if m is not None else {})}
                       for b, s, lab, n, m in zip(boxes, d.scores.tolist(), d.labels.tolist(), d.names, masks)])


@dataclass
class DetectorStep:
    """The detector's ``BatchStep``. ``masks``: RLE masks in the rows; ``on_batch(batch, detections)``:
    runs before the rows are made (pictures; the detections then carry token maps)."""

    model: MaskRCNNDetector | None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    masks: bool = True
    on_batch: Callable[[dict, list[Detections]], None] | None = None

    def counts(self) -> DetectionProgress:
        return DetectionProgress()

    def bind(self, model: MaskRCNNDetector, device: torch.device, reference: None = None) -> "DetectorStep":
        """``reference``: always None (a detector reports no decision agreement; ``ModelSpec`` refuses one)."""
        return dataclasses.replace(self, model=model, device=torch.device(device))

    def detached(self) -> "DetectorStep":
        return dataclasses.replace(self, model=None, on_batch=None)

    def prepare(self, batch: dict) -> dict:
        """``collate_detection``'s batch -> ``inputs`` on the device (one upload)."""
        return upload_detection_batch(batch, self.device)

    def run(self, batch: dict) -> tuple[pd.DataFrame, DetectionProgress]:
        """An uploaded batch -> its rows and its counts (times: the model's own)."""
        dets: list[Detections] = []
        counts = DetectionProgress(seen=len(batch["all_index"]))
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
        """One row per image of ``batch``: status, sizes, tokens per block, detections as JSON text
        (boxes xyxy in original pixels, labels 0..K-1, RLE masks)."""
        depth = self.model.config.vit.depth
        rows = []
        for idx, image_id, name, meta, d in zip(batch["index"], batch["image_id"], batch["id"], batch["metas"], dets):
            row = {"index": idx, "id": name, "image_id": int(image_id), "status": "ok", "error": "",
                   "height": meta.ori_shape[0], "width": meta.ori_shape[1], "num_detections": len(d.scores),
                   "total_tokens": d.total, "detections": _detections_json(d)}
            row.update({f"kept_b{b}": int(d.kept[b]) for b in range(depth)})
            rows.append(row)
        for idx, name, image_id, error in batch["failed"]:
            rows.append({"index": idx, "id": name, "image_id": int(image_id), "status": "skipped", "error": error,
                         "num_detections": 0, "detections": "[]"})
        return pd.DataFrame(rows)


@dataclass
class DetectionJob:
    """A detector run over ``dataset``: its step and its part files (as ``InferenceJob``)."""

    model: MaskRCNNDetector
    dataset: DetectionImages
    parts_dir: Path
    manifest: dict
    batch_size: int = 2
    workers: int = 2
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dist: DistInfo = field(default_factory=DistInfo)
    masks: bool = True
    on_batch: Callable[[dict, list[Detections]], None] | None = None

    @property
    def step(self) -> DetectorStep:
        return DetectorStep(self.model, torch.device(self.device), self.masks, self.on_batch)

    @property
    def store(self) -> PartStore:
        return open_store(self.parts_dir, self.manifest, self.batch_size, len(self.dataset), self.dist)


def run_detection(job: DetectionJob, progress: Callable[[DetectionProgress], None] | None = None,
                  on_batch: Callable[[dict, list[Detections]], None] | None = None) -> DetectionProgress:
    """Run this process's pending batches of ``job``, one part file per batch. ``on_batch(batch,
    detections)`` (or the job's) runs before a batch's part is written (pictures)."""
    step = job.step if on_batch is None else dataclasses.replace(job.step, on_batch=on_batch)
    return run_local(step, job.dataset, job.store, job.workers, progress)
