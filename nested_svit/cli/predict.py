"""``nested-svit predict``: offline batch prediction, one row per input file, for classifiers and detectors
(the family follows ``--model`` or what ``--checkpoint`` holds)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import options
from .arguments import CLS, DET, add_inference_options
from .common import PREDICT_FORMATS, check_suffix, check_writable, picture_names, write_rows
from .engine import add_engine_options, check_engine_args, ray_run
from .jobs import prepare_classifier_job, prepare_detector_job, run_with_progress, validate_inference_args
from .models import build_detector, family_of

DETECTOR_FORMATS = (".parquet", ".json", ".jsonl")


def add_parser(sub, formatter) -> None:
    about = ("offline batch prediction, one row per input file: top-k classes (classifiers) or boxes, masks and "
             "labels (detectors); the family follows --model or what --checkpoint holds")
    p = sub.add_parser("predict", help=about, description=about,
                       formatter_class=formatter)
    add_inference_options(p, (CLS, DET))
    g = p.add_argument_group("input and output")
    g.add_argument("--input", "--data", dest="input", default=None,
                   help="image folder or ImageFolder tree, one image, a .parquet file or shards, an Arrow folder, "
                        "a .txt list of paths, or a quoted glob ('photos/*.jpg')")
    g.add_argument("--demo", action="store_true",
                   help="bundled SViT trained on digits (eval/digits_experiment.py) and bundled sample images")
    g.add_argument("--out", default="predictions.parquet",
                   help=".parquet, .csv, .json or .jsonl (detectors: .parquet, .json, .jsonl)")
    options.add(p, g, "--topk", type=int, defaults={CLS: 5}, help="classes per image in the output")
    g.add_argument("--save-vis", default=None,
                   help="folder for PNGs, one per input (never read back as input): the kept tokens of each "
                        "selection (classifiers); boxes, masks and kept tokens (detectors)")
    options.add(p, g, "--vis-score-thr", type=float, defaults={DET: 0.3},
                help="boxes and masks drawn in --save-vis pictures: scores at least this")
    add_engine_options(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    if args.demo and (args.model or args.checkpoint):
        raise ValueError("--demo runs the bundled digits model; drop --model/--checkpoint (or drop --demo)")
    family = "classifier" if args.demo else family_of(args.model, args.checkpoint)
    options.resolve(args, family, args.model or (Path(args.checkpoint).name if args.checkpoint else None))
    check_engine_args(args)
    if args.engine == "ray":
        args.device = "cpu"  # the driver only checks the model; actors build their own on their devices
    if family == "detector":
        return predict_detector(args)
    return predict_classifier(args)


def predict_classifier(args: argparse.Namespace) -> int:
    from ..distributed import shutdown
    from ..evaluation.runner import merge_parts, remove_parts

    if args.demo:  # bundled model + images: a real run with nothing to download
        from importlib import resources

        assets = resources.files("nested_svit.assets")
        args.model, args.checkpoint = "svit_digits", str(assets / "svit_digits.pth")
        args.input = args.input or str(assets / "digits_samples")
    if not args.input:
        raise ValueError("--input is required (or --demo)")
    out = Path(args.out)
    check_suffix(out, PREDICT_FORMATS, "predict")
    parts = out.with_name(out.name + ".parts")
    args.data = args.input
    job, _ = prepare_classifier_job(args, parts, "predict")
    if args.save_vis:
        job.on_batch = token_pictures(Path(args.save_vis), job.model, picture_names(job.dataset.records.ids))
    try:
        from ..evaluation import run_inference

        run = ray_run(args, "classifier", job) if args.engine == "ray" else run_inference
        run_with_progress(job, "predict", run,
                          lambda s: {"img_s": f"{s.images / max(s.elapsed, 1e-9):.1f}"}, lambda s: [s.images])
        if job.dist.is_main:
            rows = merge_parts(parts, len(job.dataset))
            write_rows(rows, out)
            remove_parts(parts)
            print(f"{len(rows)} rows ({int((rows['status'] != 'ok').sum())} skipped) -> {out}")
            report_ignored(job.dataset.records.ignored)
    finally:
        shutdown(job.dist)
    return 0


def report_ignored(ignored: list[tuple[str, str]]) -> None:
    if ignored:
        print(f"{len(ignored)} files ignored (no row): " + "; ".join(f"{p} ({why})" for p, why in ignored[:10])
              + (" ..." if len(ignored) > 10 else ""), file=sys.stderr)


def token_pictures(folder: Path, model, names: dict[str, str]):
    """Callback writing one PNG per predicted image: the crop the model saw and the tokens each gate (each
    selection stage of a baseline) kept."""
    import torch

    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from ..io import atomic_write
    from ..viz import token_usage_picture

    folder.mkdir(parents=True, exist_ok=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def write(batch: dict, images, usage) -> None:
        b, _, h, w = images.shape
        gh, gw = h // model.config.patch_size, w // model.config.patch_size
        prefix = 1 if model.cls_token is not None else 0
        # per stage the patch rows kept (virtual rows, e.g. EViT's fused tokens, come after the patches)
        masks = [m.bool().view(b, -1)[:, prefix:prefix + gh * gw].reshape(b, gh, gw).cpu() for m in usage.masks]
        for j, name in enumerate(batch["id"]):
            rgb = ((images[j].float().cpu() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            keep = torch.stack([m[j] for m in masks]) if masks else torch.zeros(0, gh, gw, dtype=torch.bool)
            picture = token_usage_picture(rgb, keep, scale=max(1, 256 // max(h, w)))
            atomic_write(folder / names[name], lambda tmp: picture.save(tmp, format="PNG"))

    return write


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


def predict_detector(args: argparse.Namespace) -> int:
    from ..data.coco import DetectionImages
    from ..data.records import resolve_records
    from ..distributed import shutdown
    from ..evaluation.detection import run_detection
    from ..evaluation.runner import merge_parts, remove_parts

    if not args.input:
        raise ValueError("--input is required: an image file, a folder of images, a .txt list, a parquet file or a glob")
    validate_inference_args(args)
    out = Path(args.out)
    check_writable(out)
    check_suffix(out, DETECTOR_FORMATS, "a detector")
    model, report = build_detector(args)
    parts = out.with_name(out.name + ".parts")
    vis_dir = Path(args.save_vis) if args.save_vis else None
    records = resolve_records(args.input, args.split, exclude=[out, parts] + ([vis_dir] if vis_dir else []))
    dataset = DetectionImages(records, model.config.img_scale, max_pixels=args.max_image_pixels)
    args.data_files, args.data = [args.input], args.input
    job = prepare_detector_job(args, parts, "predict-detection", dataset, model, report)
    on_batch = None
    if vis_dir is not None:
        from ..detection.vis import save_picture

        vis_dir.mkdir(parents=True, exist_ok=True)
        names = picture_names(records.ids)

        def on_batch(batch, dets) -> None:
            for index, name, d in zip(batch["index"], batch["id"], dets):
                save_picture(dataset.decoded(index), d, vis_dir / names[name], args.vis_score_thr)
    try:
        run = ray_run(args, "detector", job) if args.engine == "ray" else \
            (lambda j, progress: run_detection(j, progress, on_batch))
        run_with_progress(job, "predict", run,
                          lambda s: {"fps_w": f"{s.images / max(s.model_seconds, 1e-9):.2f}", "dets": s.detections},
                          lambda s: [s.images])
        if job.dist.is_main:
            rows = expand_rows(merge_parts(parts, len(dataset)))
            write_rows(rows, out)
            remove_parts(parts)
            print(f"{len(rows)} rows ({int((rows['status'] != 'ok').sum())} skipped) -> {out}"
                  + (f"; pictures in {vis_dir}" if vis_dir else ""))
            report_ignored(records.ignored)
    finally:
        shutdown(job.dist)
    return 0
