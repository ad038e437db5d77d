"""``nested-svit eval imagenet`` (classifiers: top-1/top-5, keep ratios, token usage) and ``nested-svit
eval coco`` (detectors: box and mask AP with pycocotools, token usage, FPS^w / FPS^b)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import options
from .arguments import CLS, DET, add_inference_options
from .common import all_skipped, check_suffix, warn
from .jobs import data_options, run_options, run_with_progress, validate_inference_args
from .models import class_names_file, keep_budget, model_spec, show


def add_parser(sub, formatter) -> None:
    e = sub.add_parser("eval", help="evaluate on a data set (imagenet: classifiers; coco: detectors)",
                       formatter_class=formatter)
    esub = e.add_subparsers(dest="task", required=True)
    about = "classifiers: ImageNet-style top-1/top-5, keep ratios per gated block, token usage (resumable, torchrun)"
    ei = esub.add_parser("imagenet", help=about, description=about, formatter_class=formatter)
    add_inference_options(ei, (CLS,))
    g = ei.add_argument_group("data and output")
    g.add_argument("--data", "--input", dest="data", required=True,
                   help="ImageFolder tree (wnid folders -> ImageNet ids), parquet shards/file or save_to_disk folder")
    g.add_argument("--out", default="results.json", help="output file (.json, with a one-row .csv beside it; or .csv)")
    options.add(ei, g, "--topk", type=int, defaults={CLS: 5}, families=(CLS,), help="classes per image in the output")
    ei.set_defaults(func=cmd_eval_imagenet)

    about = "detectors: COCO box and mask AP (pycocotools), token usage, FPS^w / FPS^b (resumable, torchrun)"
    c = esub.add_parser("coco", help=about, description=about, formatter_class=formatter)
    add_inference_options(c, (DET,), split=None, split_help="COCO split under --data (default: val2017)")
    g = c.add_argument_group("data and output")
    g.add_argument("--data", default=None, help="COCO root with annotations/instances_<split>.json and <split>/")
    g.add_argument("--ann", default=None, help="annotation json (with --images, instead of --data)")
    g.add_argument("--images", default=None, help="image folder of --ann")
    g.add_argument("--max-images", type=int, default=None, help="evaluate the first N images by id (default: all)")
    g.add_argument("--out", default="coco-results.json", help=".json result; <name>.detections.json beside it")
    c.set_defaults(func=cmd_eval_coco)


def cmd_eval_imagenet(args: argparse.Namespace) -> int:
    import pandas as pd

    from ..distributed import shutdown
    from ..evaluation import classification_metrics
    from ..evaluation.results import checkpoint_record, run_record
    from ..inference import classifier_job, run_inference
    from ..io import atomic_write_text

    args = options.resolve(args, CLS, args.model)
    out = Path(args.out)
    if out.suffix.lower() not in (".json", ".csv"):
        raise ValueError(f"--out {out}: use .json (full result; a one-row .csv summary is written beside it) or .csv")
    validate_inference_args(args)
    json_out, csv_out = out.with_suffix(".json"), out.with_suffix(".csv")
    parts = out.with_name(out.name + ".parts")
    prepared = classifier_job(model_spec(args, CLS), data_options(args, args.data, False, [out]), run_options(args),
                              parts, "eval-imagenet", args.topk, class_names_file(args.class_names), keep_budget(args))
    show(prepared.messages)
    job, report = prepared.job, prepared.built.report

    def postfix(s) -> dict:
        post = {"img_s": f"{s.images / max(s.elapsed, 1e-9):.1f}"}
        if s.labelled:
            post["top1"] = f"{100 * s.correct1 / s.labelled:.2f}"
        return post

    try:
        _, (images,), seconds = run_with_progress(job, "eval", run_inference, postfix, lambda s: [s.images])
        if job.dist.is_main:
            rows = job.store.merge()
            metrics = classification_metrics(rows, job.model.config, job.model.config.num_tokens, args.topk)
            manifest = job.manifest
            result = {**checkpoint_record(prepared.built.name, args.checkpoint, report),
                      **metrics, "images_per_sec": images / seconds if seconds > 0 else float("nan"),
                      "images_this_run": int(images), "data": manifest["data"], "data_kind": job.dataset.records.kind,
                      "label_source": job.dataset.records.label_source,
                      "ignored_files": [{"path": p, "reason": why} for p, why in job.dataset.records.ignored],
                      "transform": manifest["transform"], "decode": manifest["decode"],
                      "jpeg_draft": manifest["jpeg_draft"], "batch_size": args.batch_size, "precision": args.precision,
                      "calibration": manifest["calibration"], **run_record(job.device, job.dist.world_size, args.backend)}
            atomic_write_text(json_out, json.dumps(result, indent=1, ensure_ascii=False))
            flat = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
            atomic_write_text(csv_out, pd.DataFrame([flat]).to_csv(index=False))
            job.store.remove()
            labelled, predicted = result["num_images"], result["num_predicted"]
            scores = (f"top1 {result['top1']:.2f}  top5 {result['top5']:.2f} on {labelled} labelled of {predicted} images"
                      if labelled else f"no labelled images among {predicted}: top-1/top-5 not computed")
            rate = f", {images / seconds:.1f} img/s" if seconds > 0 and images else ""
            print(f"{scores}  skipped {result['num_skipped']}  keep {result['mean_keep_ratio_all_gates']:.3f}  "
                  f"-> {json_out}, {csv_out} in {seconds:.1f} s{rate}")
            return all_skipped(result["num_skipped"], len(rows))
    finally:
        shutdown(job.dist)
    return 0



def _coco_split(args: argparse.Namespace) -> str:
    return args.split or "val2017"


def _coco_paths(args: argparse.Namespace):
    """``--data ROOT [--split S]`` or ``--ann FILE --images DIR``, never a mix of the two."""
    from ..data.coco import resolve_coco_paths

    if (args.ann or args.images) and (args.data or args.split):
        raise ValueError("give --data COCO_ROOT [--split S] or --ann FILE --images DIR, not both")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    return resolve_coco_paths(args.data, _coco_split(args), args.ann, args.images)


def _size_mismatches(rows, coco) -> list[dict]:
    """Images whose decoded size (EXIF orientation applied, as mmdet) differs from the json's."""
    out = []
    for r in rows[rows["status"] == "ok"].itertuples():
        info = coco.imgs[int(r.image_id)]
        if (info.get("height"), info.get("width")) != (int(r.height), int(r.width)):
            out.append({"id": r.id, "decoded": [int(r.height), int(r.width)],
                        "annotations": [info.get("height"), info.get("width")]})
    return out


def cmd_eval_coco(args: argparse.Namespace) -> int:
    from ..data.coco import CocoDetectionData, load_coco
    from ..detection.registry import list_detectors
    from ..distributed import shutdown
    from ..evaluation.detection import category_mapping, coco_metrics, coco_results
    from ..evaluation.results import checkpoint_record, run_record
    from ..evaluation.usage import usage_summary
    from ..inference import detector_job, family_of, run_detection
    from ..io import atomic_write_text

    args = options.resolve(args, DET, args.model)
    if args.model and family_of(args.model, None) != DET:
        raise ValueError(f"unknown detector {args.model!r}; available: {', '.join(list_detectors())}")
    validate_inference_args(args)
    out = Path(args.out)
    check_suffix(out, (".json",), "eval coco (a result, and <name>.detections.json beside it)")
    ann_file, image_dir = _coco_paths(args)
    coco = load_coco(ann_file)
    names = [coco.loadCats(c)[0]["name"] for c in sorted(coco.getCatIds())]
    parts = out.with_name(out.name + ".parts")
    spec = model_spec(args, DET, categories=tuple(names))
    prepared = detector_job(spec, lambda model: CocoDetectionData(ann_file, image_dir, model.config.img_scale,
                                                                  args.max_images, args.max_image_pixels),
                            run_options(args), parts, "eval-coco", str(image_dir), [ann_file, image_dir],
                            _coco_split(args), keep_budget(args))
    job, model, report = prepared.job, prepared.built.model, prepared.built.report
    mapping, mapping_note = category_mapping(list(model.class_names), coco)
    show(prepared.messages + ([f"note: {mapping_note}"] if mapping_note else []))
    dataset = job.dataset
    try:
        _, (images, model_s, backbone_s), seconds = run_with_progress(
            job, "eval coco", run_detection,
            lambda s: {"fps_w": f"{s.images / max(s.model_seconds, 1e-9):.2f}", "dets": s.detections},
            lambda s: [s.images, s.model_seconds, s.backbone_seconds])
        if job.dist.is_main:
            rows = job.store.merge()
            ok = rows[rows["status"] == "ok"]
            results = coco_results(ok, mapping)
            det_path = out.with_name(out.stem + ".detections.json")
            atomic_write_text(det_path, json.dumps(results, ensure_ascii=False))
            metrics = coco_metrics(coco, results, dataset.image_ids)
            skipped = rows[rows["status"] != "ok"]
            mismatched = _size_mismatches(rows, coco)
            if mismatched:
                warn(f"warning: {len(mismatched)} images decode (EXIF orientation applied, as mmdet does) to another "
                     "size than the annotation file says, so their boxes and masks are compared in another frame: "
                     + "; ".join(f"{m['id']} {m['decoded'][1]}x{m['decoded'][0]} vs {m['annotations'][1]}x"
                                 f"{m['annotations'][0]}" for m in mismatched[:10]) + (" ..." if len(mismatched) > 10 else ""))
            result = {
                **checkpoint_record(model.name, args.checkpoint, report),
                "annotations": str(ann_file), "images_dir": str(image_dir), "num_images": int(len(rows)),
                "num_evaluated": int(len(ok)), "num_skipped": int(len(skipped)),
                "skipped": [{"id": r.id, "reason": r.error} for r in skipped.itertuples()],
                "bbox": metrics["bbox"], "segm": metrics["segm"], "num_detections": len(results),
                "categories_note": mapping_note, "size_mismatches": mismatched,
                "calibration": job.manifest["calibration"],
                **usage_summary(ok, model.config.vit.gate_blocks, ok["total_tokens"].astype(float)),
                "fps_whole": images / model_s if model_s > 0 else None,
                "fps_backbone": images / backbone_s if backbone_s > 0 else None,
                "fps_note": "FPS^w / FPS^b: images per second of model time (preprocessed input on the device to "
                            "results on the host, masks pasted; backbone only) over the images of this run, "
                            "summed over processes' time; data loading excluded",
                "images_this_run": int(images), "img_scale": list(model.config.img_scale), "batch_size": args.batch_size,
                "detections_file": str(det_path), **run_record(job.device, job.dist.world_size, args.backend),
            }
            atomic_write_text(out, json.dumps(result, indent=1, ensure_ascii=False))
            job.store.remove()
            if metrics["bbox"]["AP"] is None:
                scores = "no ground truth: AP undefined"
            else:
                scores = f"bbox AP {metrics['bbox']['AP']:.3f}  segm AP {metrics['segm']['AP']:.3f}"
            rate = f", {images / seconds:.1f} img/s" if seconds > 0 and images else ""
            print(f"{scores}  images {len(ok)}  skipped {len(skipped)}  keep {result['mean_keep_ratio_all_gates']:.3f}"
                  f"  -> {out} in {seconds:.1f} s{rate}")
            return all_skipped(len(skipped), len(rows))
    finally:
        shutdown(job.dist)
    return 0
