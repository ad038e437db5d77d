"""``nested-svit eval imagenet`` (classifiers: top-1/top-5, keep ratios, token usage) and ``nested-svit
eval coco`` (detectors: box and mask AP with pycocotools, token usage, FPS^w / FPS^b)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import options
from .arguments import CLS, DET, add_inference_options
from .common import check_suffix, check_writable
from .jobs import prepare_classifier_job, prepare_detector_job, run_with_progress, validate_inference_args
from .models import build_detector


def add_parser(sub, formatter) -> None:
    e = sub.add_parser("eval", help="evaluate on a data set (imagenet: classifiers; coco: detectors)",
                       formatter_class=formatter)
    esub = e.add_subparsers(dest="task", required=True)
    ei = esub.add_parser("imagenet", help="ImageNet-style top-1/top-5, keep ratios, token usage", formatter_class=formatter)
    add_inference_options(ei, (CLS,))
    g = ei.add_argument_group("data and output")
    g.add_argument("--data", "--input", dest="data", required=True,
                   help="ImageFolder tree (wnid folders -> ImageNet ids), parquet shards/file or save_to_disk folder")
    g.add_argument("--out", default="results.json", help="output file (.json, with a one-row .csv beside it; or .csv)")
    options.add(ei, g, "--topk", type=int, defaults={CLS: 5}, families=(CLS,), help="classes per image in the output")
    ei.set_defaults(func=cmd_eval_imagenet)

    c = esub.add_parser("coco", help="COCO box/mask AP (pycocotools), token usage, FPS^w / FPS^b (detectors)",
                        formatter_class=formatter)
    add_inference_options(c, (DET,), split="val2017", split_help="COCO split under --data")
    g = c.add_argument_group("data and output")
    g.add_argument("--data", default=None, help="COCO root with annotations/instances_<split>.json and <split>/")
    g.add_argument("--ann", default=None, help="annotation json (with --images, instead of --data)")
    g.add_argument("--images", default=None, help="image folder of --ann")
    g.add_argument("--max-images", type=int, default=None, help="first N images by id (default: all)")
    g.add_argument("--out", default="coco-results.json", help=".json result; <name>.detections.json beside it")
    c.set_defaults(func=cmd_eval_coco)


def cmd_eval_imagenet(args: argparse.Namespace) -> int:
    import pandas as pd
    import torch

    from ..distributed import shutdown
    from ..evaluation import classification_metrics, run_inference
    from ..evaluation.runner import merge_parts, remove_parts
    from ..io import atomic_write_text

    options.resolve(args, CLS, args.model)
    out = Path(args.out)
    if out.suffix.lower() not in (".json", ".csv"):
        raise ValueError(f"--out {out}: use .json (full result; a one-row .csv summary is written beside it) or .csv")
    json_out, csv_out = out.with_suffix(".json"), out.with_suffix(".csv")
    parts = out.with_name(out.name + ".parts")
    job, report = prepare_classifier_job(args, parts, "eval-imagenet")

    def postfix(s) -> dict:
        post = {"img_s": f"{s.images / max(s.elapsed, 1e-9):.1f}"}
        if s.labelled:
            post["top1"] = f"{100 * s.correct1 / s.labelled:.2f}"
        return post

    try:
        _, (images,), seconds = run_with_progress(job, "eval", run_inference, postfix, lambda s: [s.images])
        if job.dist.is_main:
            rows = merge_parts(parts, len(job.dataset))
            metrics = classification_metrics(rows, job.model.config, job.model.config.num_tokens, args.topk)
            result = {"model": args.model, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                      "checkpoint_sha256": report.sha256 if report else None,
                      "checkpoint_format": report.format if report else None,
                      "checkpoint_notes": report.notes if report else [],
                      **metrics, "images_per_sec": images / seconds if seconds > 0 else float("nan"),
                      "images_this_run": int(images), "data": job.manifest["data"], "data_kind": job.dataset.records.kind,
                      "label_source": job.dataset.records.label_source,
                      "ignored_files": [{"path": p, "reason": why} for p, why in job.dataset.records.ignored],
                      "transform": job.manifest["transform"], "batch_size": args.batch_size,
                      "world_size": job.dist.world_size, "device": str(job.device), "precision": args.precision,
                      "backend": args.backend, "torch_version": torch.__version__}
            atomic_write_text(json_out, json.dumps(result, indent=1))
            flat = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
            atomic_write_text(csv_out, pd.DataFrame([flat]).to_csv(index=False))
            remove_parts(parts)
            scores = (f"top1 {result['top1']:.2f}  top5 {result['top5']:.2f}" if result["num_images"] else
                      "no labelled images: top-1/top-5 not computed")
            print(f"{scores}  images {result['num_predicted']}  "
                  f"skipped {result['num_skipped']}  keep {result['mean_keep_ratio_all_gates']:.3f}  -> {json_out}, {csv_out}")
    finally:
        shutdown(job.dist)
    return 0


def cmd_eval_coco(args: argparse.Namespace) -> int:
    import torch

    from ..data.coco import CocoDetectionData, load_coco, resolve_coco_paths
    from ..detection.checkpoint import detector_from_file
    from ..detection.registry import is_detector, list_detectors
    from ..distributed import shutdown
    from ..evaluation.detection import coco_metrics, coco_results, run_detection
    from ..evaluation.runner import merge_parts, remove_parts
    from ..evaluation.usage import usage_summary
    from ..io import atomic_write_text

    options.resolve(args, DET, args.model)
    args.model = args.model if args.model or detector_from_file(args.checkpoint) else "svit_adapter_small_maskrcnn"
    if args.model and not is_detector(args.model):
        raise ValueError(f"unknown detector {args.model!r}; available: {', '.join(list_detectors())}")
    validate_inference_args(args)
    out = Path(args.out)
    check_writable(out)
    check_suffix(out, (".json",), "eval coco (a result, and <name>.detections.json beside it)")
    ann_file, image_dir = resolve_coco_paths(args.data, args.split, args.ann, args.images)
    coco = load_coco(ann_file)
    cat_ids = sorted(coco.getCatIds())
    names = [coco.loadCats(c)[0]["name"] for c in cat_ids]
    model, report = build_detector(args, num_classes=len(cat_ids), class_names=names)
    if model.config.num_classes != len(cat_ids):
        raise ValueError(f"the model predicts {model.config.num_classes} classes, {ann_file} has {len(cat_ids)} categories")
    dataset = CocoDetectionData(ann_file, image_dir, model.config.img_scale, args.max_images, args.max_image_pixels)
    args.data_files = [ann_file, image_dir]
    parts = out.with_name(out.name + ".parts")
    job = prepare_detector_job(args, parts, "eval-coco", dataset, model, report)
    try:
        _, (images, model_s, backbone_s), _ = run_with_progress(
            job, "eval coco", run_detection,
            lambda s: {"fps_w": f"{s.images / max(s.model_seconds, 1e-9):.2f}", "dets": s.detections},
            lambda s: [s.images, s.model_seconds, s.backbone_seconds])
        if job.dist.is_main:
            rows = merge_parts(parts, len(dataset))
            ok = rows[rows["status"] == "ok"]
            results = coco_results(ok, cat_ids)
            det_path = out.with_name(out.stem + ".detections.json")
            atomic_write_text(det_path, json.dumps(results))
            metrics = coco_metrics(coco, results, dataset.image_ids)
            skipped = rows[rows["status"] != "ok"]
            result = {
                "model": model.name, "checkpoint": args.checkpoint, "checkpoint_sha256": report.sha256 if report else None,
                "checkpoint_format": report.format if report else None, "checkpoint_notes": report.notes if report else [],
                "annotations": str(ann_file), "images_dir": str(image_dir), "num_images": int(len(rows)),
                "num_evaluated": int(len(ok)), "num_skipped": int(len(skipped)),
                "skipped": [{"id": r.id, "reason": r.error} for r in skipped.itertuples()],
                "bbox": metrics["bbox"], "segm": metrics["segm"], "num_detections": len(results),
                **usage_summary(ok, model.config.vit.gate_blocks, ok["total_tokens"].astype(float)),
                "fps_whole": images / model_s if model_s > 0 else None,
                "fps_backbone": images / backbone_s if backbone_s > 0 else None,
                "fps_note": "FPS^w / FPS^b: images per second of model time (preprocessed input on the device to "
                            "results on the host, masks pasted; backbone only) over the images of this run, "
                            "summed over processes' time; data loading excluded",
                "images_this_run": int(images), "img_scale": list(model.config.img_scale), "batch_size": args.batch_size,
                "world_size": job.dist.world_size, "device": str(job.device), "backend": args.backend,
                "detections_file": str(det_path), "torch_version": torch.__version__,
            }
            atomic_write_text(out, json.dumps(result, indent=1))
            remove_parts(parts)
            print(f"bbox AP {metrics['bbox']['AP']:.3f}  segm AP {metrics['segm']['AP']:.3f}  images {len(ok)}  "
                  f"skipped {len(skipped)}  keep {result['mean_keep_ratio_all_gates']:.3f}  -> {out}")
    finally:
        shutdown(job.dist)
    return 0
