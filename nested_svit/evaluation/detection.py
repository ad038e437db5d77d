"""COCO detection / instance segmentation evaluation: sharded, resumable inference (the same part
files, manifest and batch sharding as ``runner.py``), COCO results, and pycocotools metrics."""
from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch.utils.data import DataLoader

from ..data.coco import DetectionImages, collate_detection, upload_detection_batch
from ..data.prefetch import prefetched
from ..devices import is_real_cuda
from ..detection.detector import Detections, MaskRCNNDetector
from ..distributed import DistInfo
from .runner import _check_manifest, pending_batches, write_part

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass
class DetectionJob:
    model: MaskRCNNDetector
    dataset: DetectionImages
    parts_dir: Path
    manifest: dict
    batch_size: int = 2
    workers: int = 2
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dist: DistInfo = field(default_factory=DistInfo)
    masks: bool = True


@dataclass
class DetectionProgress:
    images: int = 0  # detected by this process in this run
    seen: int = 0  # detected or skipped
    detections: int = 0
    elapsed: float = 0.0
    model_seconds: float = 0.0  # whole network (FPS^w), this process, this run
    backbone_seconds: float = 0.0  # backbone only (FPS^b)

    def add(self, other: "DetectionProgress") -> None:
        for name in ("images", "seen", "detections", "model_seconds", "backbone_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _detections_json(d: Detections) -> str:
    boxes = d.boxes.tolist()
    masks = d.masks if isinstance(d.masks, list) else [None] * len(boxes)
    return json.dumps([{"bbox": [round(v, 4) for v in b], "score": float(s), "label": int(lab), "name": n,
                        **({"segmentation": m} if m is not None else {})}
                       for b, s, lab, n, m in zip(boxes, d.scores.tolist(), d.labels.tolist(), d.names, masks)])


def detection_rows(job: DetectionJob, batch: dict, dets: list[Detections]) -> pd.DataFrame:
    """One row per image of ``batch``: status, sizes, tokens per block, detections as JSON text
    (boxes xyxy in original pixels, labels 0..K-1, RLE masks)."""
    depth = job.model.config.vit.depth
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


def detect_batch(job: DetectionJob, batch: dict, token_maps: bool = False
                 ) -> tuple[pd.DataFrame, list[Detections], DetectionProgress]:
    """One uploaded batch (``upload_detection_batch``) -> its rows, detections and counts (no times
    but the model's). The one per-batch step of both engines (local and Ray)."""
    dets: list[Detections] = []
    counts = DetectionProgress(seen=len(batch["all_index"]))
    if batch["inputs"]:
        timer: dict = {}
        dets = job.model.predict_preprocessed(batch["inputs"], batch["metas"], "rle" if job.masks else None,
                                              timer=timer, token_maps=token_maps)
        counts.model_seconds, counts.backbone_seconds = timer["total"], timer["backbone"]
        counts.images = len(dets)
        counts.detections = sum(len(d.scores) for d in dets)
    return detection_rows(job, batch, dets), dets, counts


def run_detection(job: DetectionJob, progress: Callable[[DetectionProgress], None] | None = None,
                  on_batch: Callable[[dict, list[Detections]], None] | None = None) -> DetectionProgress:
    """Run this process's pending batches, one part file per batch. ``on_batch(batch, detections)``
    runs before a batch's part is written (pictures); detections then carry token maps."""
    _check_manifest(job)
    job.parts_dir.mkdir(parents=True, exist_ok=True)
    todo = pending_batches(job)
    loader = DataLoader(job.dataset, batch_sampler=todo, num_workers=job.workers, collate_fn=collate_detection,
                        persistent_workers=False, pin_memory=is_real_cuda(job.device))
    job.model.eval()
    state = DetectionProgress()
    start = time.perf_counter()
    for batch in prefetched(loader, job.device, lambda b: upload_detection_batch(b, job.device)):
        frame, dets, counts = detect_batch(job, batch, token_maps=on_batch is not None)
        if on_batch is not None and dets:
            on_batch(batch, dets)
        write_part(job, batch, frame)
        state.add(counts)
        state.elapsed = time.perf_counter() - start
        if progress:
            progress(state)
    return state


def category_mapping(class_names: list[str], coco) -> tuple[dict[int, int], str | None]:
    """Model label -> the annotation file's category id, and a note when it is not the usual one.
    As many classes as categories: label ``i`` is the ``i``-th category by ascending id (mmdet's rule).
    Otherwise the categories must all be among the model's classes, by name, or (an 80-class COCO model)
    by COCO category id; the other classes' detections are left out. Anything else is a ValueError."""
    from ..detection.classes import COCO_CATEGORY_IDS

    cats = [coco.cats[c] for c in sorted(coco.getCatIds())]
    if len(class_names) == len(cats):
        return {i: c["id"] for i, c in enumerate(cats)}, None
    names = [c["name"] for c in cats]
    head = f"the checkpoint predicts {len(class_names)} classes; the annotations have {len(cats)} categories"
    if all(n in class_names for n in names):
        return ({class_names.index(c["name"]): c["id"] for c in cats},
                f"{head}, all among its classes: evaluated by class name ({', '.join(names[:8])}"
                + (" ..." if len(names) > 8 else "") + "); its other classes' detections are left out")
    if len(class_names) == len(COCO_CATEGORY_IDS) and all(c["id"] in COCO_CATEGORY_IDS for c in cats):
        return ({COCO_CATEGORY_IDS.index(c["id"]): c["id"] for c in cats},
                f"{head}, all COCO category ids: evaluated by id; its other classes' detections are left out")
    raise ValueError(f"{head} ({', '.join(names[:8])}{' ...' if len(names) > 8 else ''}), which are not among its "
                     "classes by name or COCO id: evaluate a detector trained on these categories")


def coco_results(rows: pd.DataFrame, categories: list[int] | dict[int, int]) -> list[dict]:
    """Rows -> COCO results (``bbox`` as x, y, w, h; the annotation file's category ids; RLE
    ``segmentation``). ``categories``: model label -> category id (a list: by position); detections of
    labels it does not map are left out."""
    mapping = dict(enumerate(categories)) if isinstance(categories, (list, tuple)) else dict(categories)
    out = []
    for image_id, text in zip(rows["image_id"], rows["detections"]):
        for d in json.loads(text):
            if d["label"] not in mapping:
                continue
            x1, y1, x2, y2 = d["bbox"]
            res = {"image_id": int(image_id), "category_id": int(mapping[d["label"]]),
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "score": d["score"]}
            if "segmentation" in d:
                res["segmentation"] = d["segmentation"]
            out.append(res)
    return out


def coco_metrics(coco_gt, results: list[dict], image_ids: list[int], iou_types: tuple[str, ...] = ("bbox", "segm")) -> dict:
    """pycocotools ``COCOeval`` over ``image_ids`` -> ``{iou_type: {stat name: value}}`` (12 stats each).
    With no detections at all every stat is 0 (pycocotools cannot load an empty result list); with no
    ground truth on those images every stat is None (AP is undefined)."""
    from pycocotools.cocoeval import COCOeval

    out: dict = {}
    if not coco_gt.getAnnIds(imgIds=list(image_ids)):
        return {iou_type: {name: None for name in STAT_NAMES} for iou_type in iou_types}
    for iou_type in iou_types:
        usable = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not usable:
            out[iou_type] = {name: 0.0 for name in STAT_NAMES}
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(usable)
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[iou_type] = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}
    return out
