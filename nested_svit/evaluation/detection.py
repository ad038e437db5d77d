"""COCO detection / instance segmentation evaluation of detector rows (``inference.detect``): the
model's labels mapped to the annotation file's categories, COCO results, pycocotools metrics, and the
result of ``eval coco`` (``evaluate_coco``: its record and ``<name>.detections.json``)."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Callable

import pandas as pd

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


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
    """Rows (``inference.detect``'s list columns) -> COCO results (``bbox`` as x, y, w, h; the annotation
    file's category ids; RLE ``segmentation``). ``categories``: model label -> category id (a list: by
    position); detections of labels it does not map are left out."""
    mapping = dict(enumerate(categories)) if isinstance(categories, (list, tuple)) else dict(categories)
    out = []
    for image_id, boxes, scores, labels, masks in zip(rows["image_id"], rows["boxes"], rows["scores"], rows["labels"],
                                                      rows["masks_rle"]):
        masks = list(masks) if len(masks) else [None] * len(boxes)
        for box, score, label, mask in zip(boxes, scores, labels, masks):
            if int(label) not in mapping:
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            res = {"image_id": int(image_id), "category_id": int(mapping[int(label)]),
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)}
            if mask is not None:
                res["segmentation"] = json.loads(mask)  # the rows' RLE text, as COCO takes it
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


FPS_NOTE = ("FPS^w / FPS^b: images per second of model time (preprocessed input on the device to results on the "
            "host, masks pasted; backbone only) over the images of this run, summed over processes' time; data "
            "loading excluded")


def size_mismatches(rows: pd.DataFrame, coco) -> list[dict]:
    """Images whose decoded size (EXIF orientation applied, as mmdet) differs from the json's."""
    out = []
    for r in rows[rows["status"] == "ok"].itertuples():
        info = coco.imgs[int(r.image_id)]
        if (info.get("height"), info.get("width")) != (int(r.height), int(r.width)):
            out.append({"id": r.id, "decoded": [int(r.height), int(r.width)],
                        "annotations": [info.get("height"), info.get("width")]})
    return out


def evaluate_coco(job, coco, categories: tuple[dict[int, int], str | None], ann_file: str | Path,
                  image_dir: str | Path, out: Path, progress: Callable | None = None) -> tuple[dict, object] | None:
    """Run ``job`` (``inference.detector_job`` over the annotation file's images) and, on the main process,
    write ``<out stem>.detections.json`` (COCO results) and ``out`` (box and mask AP, token usage, FPS^w /
    FPS^b, the run's record) -> (that record, the run's counts). ``categories``: ``category_mapping``'s (label -> category id,
    and its note)."""
    from ..io import atomic_write_text
    from .results import checkpoint_record, run_record
    from .usage import usage_summary

    model, (mapping, mapping_note) = job.model, categories
    counts = job.run(progress)
    if not job.dist.is_main:
        return None
    rows = job.rows()
    ok, skipped = rows[rows["status"] == "ok"], rows[rows["status"] != "ok"]
    results = coco_results(ok, mapping)
    det_path = out.with_name(out.stem + ".detections.json")
    atomic_write_text(det_path, json.dumps(results, ensure_ascii=False))
    metrics = coco_metrics(coco, results, job.dataset.image_ids)
    images, record = counts.images, job.run_record
    result = {
        **checkpoint_record(model.name, job.spec.checkpoint, job.built.report),
        "annotations": str(ann_file), "images_dir": str(image_dir), "num_images": int(len(rows)),
        "num_evaluated": int(len(ok)), "num_skipped": int(len(skipped)),
        "skipped": [{"id": r.id, "reason": r.error} for r in skipped.itertuples()],
        "bbox": metrics["bbox"], "segm": metrics["segm"], "num_detections": len(results),
        "categories_note": mapping_note, "size_mismatches": size_mismatches(rows, coco),
        "calibration": record["calibration"], "compile": bool(record.get("compile", False)),
        **usage_summary(ok, model.config.vit.gate_blocks, ok["total_tokens"].astype(float)),
        "fps_whole": images / counts.model_seconds if counts.model_seconds > 0 else None,
        "fps_backbone": images / counts.backbone_seconds if counts.backbone_seconds > 0 else None,
        "fps_note": FPS_NOTE, "images_this_run": int(images), "img_scale": list(model.config.img_scale),
        "batch_size": job.store.batch_size, "detections_file": str(det_path),
        **run_record(job.device, job.dist.world_size, job.spec.backend),
    }
    atomic_write_text(out, json.dumps(result, indent=1, ensure_ascii=False))
    job.store.remove()
    return result, counts
