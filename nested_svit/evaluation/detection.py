"""COCO detection / instance segmentation evaluation of detector rows (``inference.detect``): the
model's labels mapped to the annotation file's categories, COCO results, and pycocotools metrics."""
from __future__ import annotations

import contextlib
import io
import json

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
