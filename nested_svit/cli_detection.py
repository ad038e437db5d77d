"""``nested-svit eval coco`` and ``nested-svit predict`` with a detector."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_img_scale(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        w, h = (int(v) for v in value.lower().replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"--img-scale must be W,H (e.g. 1333,800), got {value!r}") from None
    if min(w, h) < 32:
        raise ValueError(f"--img-scale {value}: both sizes must be >= 32")
    return w, h


def _read_detector_file_config(path: str | None):
    """(model name, DetectorConfig) carried by a file ``save_detector_checkpoint`` wrote, else (None, None)."""
    from .checkpoint import peek_checkpoint
    from .detection.config import DetectorConfig

    top = peek_checkpoint(path)
    if isinstance(top, dict) and top.get("format") == "nested_svit" and top.get("kind") == "detector":
        return top.get("model_name"), DetectorConfig.from_dict(top["model_config"])
    return None, None


def build_detector(args: argparse.Namespace, num_classes: int | None = None, class_names: list[str] | None = None):
    """Detector of ``args.model`` (or the config its checkpoint carries) with weights loaded, before
    any image is read. -> (model, load report or None)."""
    import torch

    from . import load_checkpoint
    from .detection import create_detector
    from .detection.detector import MaskRCNNDetector

    name, file_cfg = _read_detector_file_config(args.checkpoint)
    overrides: dict = {}
    scale = parse_img_scale(args.img_scale)
    if scale:
        overrides["img_scale"] = scale
    if num_classes is not None and (file_cfg is None or file_cfg.num_classes != num_classes):
        overrides["num_classes"] = num_classes
    if class_names:
        overrides["class_names"] = tuple(class_names)
    torch.manual_seed(args.seed)
    if file_cfg is not None:
        from dataclasses import replace

        model = MaskRCNNDetector(replace(file_cfg, **overrides))
        model.name = name or args.model
    else:
        model = create_detector(args.model or "svit_adapter_small_maskrcnn", **overrides)
    report = load_checkpoint(model, args.checkpoint) if args.checkpoint else None
    if report is None and not args.random_weights:
        raise ValueError("--checkpoint is required (or pass --random-weights to run an untrained model)")
    if report is not None and model.backbone.num_gates and report.format in ("mmdet-dense", "imagenet"):
        note = ("warning: the checkpoint has no gate weights, so the gates of this SViT detector are random: "
                "pruning is arbitrary. Use an SViT checkpoint, or the dense vit_adapter_* model")
        report.notes.append(note)
        print(note, file=sys.stderr)
    return model, report


def _prepare(args: argparse.Namespace, parts_dir: Path, kind: str, dataset, model, report):
    import torch

    from .evaluation.detection import DetectionJob
    from .evaluation.distributed import init_from_env

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    info = init_from_env(device)
    if device == "cuda" and info.world_size > 1:
        device = f"cuda:{info.local_rank}"
    if args.threads:
        torch.set_num_threads(args.threads)
    model.to(device).eval().set_execution("packed", args.backend)
    manifest = {"kind": kind, "model": model.name, "checkpoint_sha256": report.sha256 if report else None,
                "data": [str(Path(f).resolve()) for f in (args.data_files or [])], "num_records": len(dataset),
                "batch_size": args.batch_size, "img_scale": list(model.config.img_scale),
                "seed": args.seed if report is None else None}
    return DetectionJob(model, dataset, parts_dir, manifest, args.batch_size, args.workers, torch.device(device), info)


def _run(job, label: str, on_batch=None):
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from .evaluation.detection import run_detection
    from .evaluation.distributed import barrier
    from .evaluation.runner import pending_batches

    todo = sum(len(b) for b in pending_batches(job))
    bar = tqdm(total=todo, desc=label, unit="img", file=sys.stderr, disable=not job.dist.is_main)
    done = [0]

    def progress(state) -> None:
        bar.update(state.images - done[0])
        done[0] = state.images
        bar.set_postfix(fps_w=f"{state.images / max(state.model_seconds, 1e-9):.2f}", dets=state.detections)

    state = run_detection(job, progress, on_batch)
    bar.update(todo - bar.n)
    bar.close()
    barrier(job.dist)
    totals = [state.images, state.model_seconds, state.backbone_seconds]
    if job.dist.world_size > 1:
        t = torch.tensor(totals, dtype=torch.float64, device=job.device)
        dist.all_reduce(t)
        totals = t.tolist()
    return totals


def cmd_eval_coco(args: argparse.Namespace) -> int:
    import torch

    from .data.coco import CocoDetectionData, resolve_coco_paths
    from .evaluation.detection import coco_metrics, coco_results
    from .evaluation.usage import usage_summary
    from .evaluation.distributed import shutdown
    from .evaluation.runner import merge_parts, remove_parts
    from .io import atomic_write_text

    _check_common(args)
    from .cli import check_writable
    from .detection.registry import is_detector

    if not is_detector(args.model) and _read_detector_file_config(args.checkpoint)[1] is None:
        from .detection.registry import list_detectors

        raise ValueError(f"unknown detector {args.model!r}; available: {', '.join(list_detectors())}")
    out = Path(args.out)
    check_writable(out)
    if out.suffix.lower() != ".json":
        raise ValueError(f"--out {out}: eval coco writes a .json result (and <name>.detections.json beside it)")
    ann_file, image_dir = resolve_coco_paths(args.data, args.split, args.ann, args.images)
    from .data.coco import load_coco

    coco = load_coco(ann_file)
    cat_ids = sorted(coco.getCatIds())
    names = [coco.loadCats(c)[0]["name"] for c in cat_ids]
    model, report = build_detector(args, num_classes=len(cat_ids), class_names=names)
    if model.config.num_classes != len(cat_ids):
        raise ValueError(f"the model predicts {model.config.num_classes} classes, {ann_file} has {len(cat_ids)} categories")
    dataset = CocoDetectionData(ann_file, image_dir, model.config.img_scale, args.max_images)
    args.data_files = [ann_file, image_dir]
    parts = out.with_name(out.name + ".parts")
    job = _prepare(args, parts, "eval-coco", dataset, model, report)
    try:
        images, model_s, backbone_s = _run(job, "eval coco")
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


def expand_rows(rows):
    """Detection rows -> list columns: boxes (xyxy), scores, labels, names, masks (RLE JSON strings)."""
    dets = [json.loads(t) for t in rows["detections"]]
    rows = rows.drop(columns=["detections"]).copy()
    rows["boxes"] = [[d["bbox"] for d in ds] for ds in dets]
    rows["scores"] = [[d["score"] for d in ds] for ds in dets]
    rows["labels"] = [[d["label"] for d in ds] for ds in dets]
    rows["names"] = [[d["name"] for d in ds] for ds in dets]
    rows["masks_rle"] = [[json.dumps(d["segmentation"]) for d in ds if "segmentation" in d] for ds in dets]
    return rows


def cmd_predict_detection(args: argparse.Namespace) -> int:
    from .data.coco import image_list_data
    from .detection.preprocess import read_image
    from .evaluation.distributed import shutdown
    from .evaluation.runner import merge_parts, remove_parts
    from .io import atomic_write, atomic_write_text

    _check_common(args)
    from .cli import check_writable

    check_writable(Path(args.out))
    out = Path(args.out)
    fmt = out.suffix.lower()
    if fmt not in (".parquet", ".json", ".jsonl"):
        raise ValueError(f"--out {out}: a detector writes .parquet, .json or .jsonl")
    model, report = build_detector(args)
    dataset = image_list_data(args.input, model.config.img_scale)
    args.data_files = [args.input]
    parts = out.with_name(out.name + ".parts")
    job = _prepare(args, parts, "predict-detection", dataset, model, report)
    vis_dir = Path(args.save_vis) if args.save_vis else None
    on_batch = None
    if vis_dir is not None:
        from .detection.vis import save_picture

        vis_dir.mkdir(parents=True, exist_ok=True)

        def on_batch(batch, dets) -> None:
            for name, d in zip(batch["id"], dets):
                save_picture(read_image(dataset.files[dataset.ids.index(name)]), d,
                             vis_dir / (Path(name).with_suffix("").as_posix().replace("/", "__") + ".png"))
    try:
        _run(job, "predict", on_batch)
        if job.dist.is_main:
            rows = expand_rows(merge_parts(parts, len(dataset)))
            if fmt == ".parquet":
                atomic_write(out, lambda tmp: rows.to_parquet(tmp, index=False))
            else:
                atomic_write_text(out, rows.to_json(orient="records", lines=fmt == ".jsonl",
                                                    indent=None if fmt == ".jsonl" else 1))
            remove_parts(parts)
            print(f"{len(rows)} rows ({int((rows['status'] != 'ok').sum())} skipped) -> {out}"
                  + (f"; pictures in {vis_dir}" if vis_dir else ""))
    finally:
        shutdown(job.dist)
    return 0


def _check_common(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")


def add_eval_coco_parser(esub) -> None:
    c = esub.add_parser("coco", help="COCO box/mask AP (pycocotools), token usage, FPS^w / FPS^b",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--model", default="svit_adapter_small_maskrcnn")
    c.add_argument("--checkpoint", default=None, help="official SViT/ViT-Adapter mmdet .pth, or ours")
    c.add_argument("--random-weights", action="store_true", help="allow running without a checkpoint")
    c.add_argument("--data", default=None, help="COCO root with annotations/instances_<split>.json and <split>/")
    c.add_argument("--split", default="val2017")
    c.add_argument("--ann", default=None, help="annotation json (with --images instead of --data)")
    c.add_argument("--images", default=None, help="image folder of --ann")
    c.add_argument("--max-images", type=int, default=None, help="first N images by id")
    c.add_argument("--img-scale", default=None, help="W,H test scale (default: the model's, 1333,800)")
    c.add_argument("--batch-size", type=int, default=2, help="images of any sizes run together")
    c.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding/resizing images")
    c.add_argument("--device", default="auto")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--backend", default="auto", help="attention backend")
    c.add_argument("--seed", type=int, default=0, help="initialisation seed for --random-weights")
    c.add_argument("--out", default="coco-results.json")
    c.set_defaults(func=cmd_eval_coco)


def cmd_train_detector(args: argparse.Namespace) -> int:
    """``nested-svit train`` with a detector on COCO-format data (``--data ROOT --split S`` or ``--ann --images``)."""
    import torch

    from . import load_checkpoint
    from .cli import check_writable, train_note
    from .data.coco import CocoTrainData, load_coco, resolve_coco_paths
    from .detection import create_detector
    from .detection.trainer import DetectorTrainer, DetTrainConfig

    check_writable(Path(args.out))
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.flip <= 1:
        raise ValueError(f"--flip must be a probability, got {args.flip}")
    ann_file, image_dir = resolve_coco_paths(args.data, args.split, args.ann, args.images)
    coco = load_coco(ann_file)
    names = [coco.loadCats(c)[0]["name"] for c in sorted(coco.getCatIds())]
    if args.num_classes is not None and args.num_classes != len(names):
        raise ValueError(f"--num-classes {args.num_classes}, but {ann_file} has {len(names)} categories")
    overrides: dict = {"num_classes": len(names), "class_names": tuple(names),
                       "reactivation": not args.no_reactivation, "gate_tau": args.tau}
    scale = parse_img_scale(args.img_scale)
    if scale:
        overrides["img_scale"] = scale
    torch.manual_seed(args.seed)
    model = create_detector(args.model, **overrides)
    gated = model.backbone.prunes  # SViT or a baseline: fine-tuned from a dense detector with the sparse recipe
    if args.init:
        for note in load_checkpoint(model, args.init, strict=True).notes:
            train_note(note)
    if args.threads:
        torch.set_num_threads(args.threads)
    fine_tune = gated and args.init is not None
    defaults = DetTrainConfig()
    cfg = DetTrainConfig(
        epochs=args.epochs or defaults.epochs, batch_size=args.batch_size or defaults.batch_size,
        lr=args.lr if args.lr is not None else (1e-5 if fine_tune else defaults.lr), gate_lr=args.gate_lr,
        weight_decay=args.weight_decay if args.weight_decay is not None else (1e-6 if fine_tune else defaults.weight_decay),
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else defaults.warmup_steps,
        schedule=args.schedule or "step",
        steps=tuple(int(v) for v in args.steps.split(",")) if args.steps else defaults.steps,
        clip_grad=args.clip_grad, ratio_weight=args.ratio_weight, ratio_loss=args.ratio_loss, amp=args.amp,
        seed=args.seed, workers=args.workers, checkpoint_every=args.checkpoint_every, sync_bn=not args.no_sync_bn,
        drop_path=args.drop_path if args.drop_path is not None else (0.1 if model.config.vit.embed_dim <= 192 else 0.2),
        device=args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    data = CocoTrainData(ann_file, image_dir, model.config.img_scale, flip=args.flip, seed=args.seed,
                         multiscale=args.multiscale_crop)
    if data.left_out:
        train_note(f"{data.left_out} images without usable annotations are left out (as mmdet's filter_empty_gt)")
    from .cli import fit_with_progress, join_process_group

    join_process_group(cfg.device)
    trainer = DetectorTrainer(model, data, cfg, checkpoint_path=args.out)

    return fit_with_progress(args, trainer, cfg.epochs,
                             lambda e: {"loss": f"{e.losses['loss']:.3f}"} if e.losses else {})
