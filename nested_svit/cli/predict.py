"""``nested-svit predict``: offline batch prediction, one row per input file, for classifiers and detectors
(the family follows ``--model`` or what ``--checkpoint`` holds)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from typing import Callable

from . import options
from .arguments import CLS, DET, add_inference_options, add_valid_labels_option
from .common import PREDICT_FORMATS, all_skipped, capacity_note, check_suffix, check_writable, picture_names, write_rows
from .engine import add_engine_options, check_engine_args, ray_run, retried_note, threads_note
from .jobs import data_options, run_options, run_with_progress, validate_inference_args
from .models import class_names_file, keep_budget, model_spec, show

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
                        "a .txt list of paths, a quoted glob ('photos/*.jpg'), an object store prefix or glob "
                        "(s3://bucket/val/), or a .csv/.parquet manifest of URIs (--uri-column)")
    g.add_argument("--demo", action="store_true",
                   help="bundled SViT trained on digits (eval/digits_experiment.py) and bundled sample images")
    g.add_argument("--out", default="predictions.parquet",
                   help=".parquet, .csv, .json or .jsonl (detectors: .parquet, .json, .jsonl); a folder ending in / "
                        "or an object store prefix (s3://bucket/preds/; classifiers): a partitioned Parquet data "
                        "set, one part per batch, _manifest.json and _SUCCESS at the end")
    options.add(p, g, "--topk", type=int, defaults={CLS: 5}, help="classes per image in the output")
    add_valid_labels_option(p, g, (CLS, DET))
    g.add_argument("--save-vis", default=None,
                   help="folder for PNGs, one per input (never read back as input): the kept tokens of each "
                        "selection (classifiers); boxes, masks and kept tokens (detectors)")
    options.add(p, g, "--vis-score-thr", type=float, defaults={DET: 0.3},
                help="boxes and masks drawn in --save-vis pictures: scores at least this")
    add_engine_options(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from ..inference import family_of

    if args.demo and (args.model or args.checkpoint):
        raise ValueError("--demo runs the bundled digits model; drop --model/--checkpoint (or drop --demo)")
    family = "classifier" if args.demo else family_of(args.model, args.checkpoint)
    args = options.resolve(args, family, args.model or (Path(args.checkpoint).name if args.checkpoint else None))
    check_engine_args(args)
    return (predict_detector if family == "detector" else predict_classifier)(args)


def _demo() -> tuple[str, str, str]:
    """The bundled model and images: (model name, checkpoint, input folder). Its classes are the digits
    0-9, the names of the sample folders."""
    from importlib import resources

    assets = resources.files("nested_svit.assets")
    return "svit_digits", str(assets / "svit_digits.pth"), str(assets / "digits_samples")


def _run(args: argparse.Namespace, spec, local: Callable) -> Callable:
    """The engine's run of a job: ``local`` here (or under torchrun), or Ray's schedule of the same step."""
    return ray_run(args, spec) if args.engine == "ray" else local


def predict_classifier(args: argparse.Namespace) -> int:
    from ..distributed import shutdown
    from ..inference import Scoring, classifier_job, provenance, run_inference
    from ..inference.spec import bf16_note
    from ..inference.dataset_out import is_dataset_out, prepare_dataset_output

    name, checkpoint, demo_input = _demo() if args.demo else (None, None, None)
    source = args.input or demo_input
    if not source:
        raise ValueError("--input is required (or --demo)")
    out, dataset_out = Path(args.out), is_dataset_out(args.out)
    validate_inference_args(args)
    if dataset_out:
        if args.save_vis:
            raise ValueError("--save-vis needs a file --out (its rows name the pictures); a data set --out DIR/ "
                             "has no picture column")
        parts, notes = args.out, prepare_dataset_output(args.out)  # the parts are the output
    else:
        check_suffix(out, PREDICT_FORMATS, "predict")
        parts, notes = out.with_name(out.name + ".parts"), []
    spec = model_spec(args, "classifier", name, checkpoint)
    names = class_names_file(args.class_names) or ([str(d) for d in range(10)] if args.demo else None)
    prepared = classifier_job(spec, data_options(args, source, True, [out, args.save_vis]),
                              run_options(args), parts, "predict", args.topk, names, keep_budget(args),
                              decode_here=args.engine == "local", scoring=Scoring(args.valid_labels))
    show(_engine_notes(args) + prepared.messages + bf16_note(spec, prepared.job.device) + notes
         + ([] if dataset_out else _recompute_note(out, parts)))
    job = prepared.job
    pictures = picture_names(job.dataset.records.ids) if args.save_vis else None
    if args.save_vis:
        job.on_batch = token_pictures(Path(args.save_vis), job.model, pictures, job.class_names)
    try:
        state, (images, reruns), seconds = run_with_progress(job, "predict", _run(args, spec, run_inference),
                                                  lambda s: {"img_s": f"{s.images / max(s.elapsed, 1e-9):.1f}"},
                                                  lambda s: [s.images, s.capacity_reruns])
        if not job.dist.is_main:
            return 0
        rows = job.store.merge()
        if pictures:
            rows["picture"] = [pictures[i] if ok == "ok" else None for i, ok in zip(rows["id"], rows["status"])]
        meta = provenance(prepared.built, spec, transform=job.manifest["transform"], data=job.manifest["data"],
                          calibration=job.manifest["calibration"], class_names=job.class_names, topk=args.topk,
                          decode=job.manifest["decode"], engine=args.engine,
                          **({"valid_labels": prepared.scoring.valid_name} if prepared.scoring.valid else {}))
        if dataset_out:
            job.store.finish(meta, len(rows))
        else:
            write_rows(rows, out, meta)
            job.store.remove()
        extra = (f"; pictures in {args.save_vis}" if args.save_vis else "") + retried_note(state)
        if spec.capacity:  # every process's and Ray actor's batches of this run
            extra += "; " + capacity_note(spec.capacity, int(reruns))
        return _summary(rows, args.out if dataset_out else out, images, seconds, job.dataset.records.ignored, extra)
    finally:
        shutdown(job.dist)


def _engine_notes(args: argparse.Namespace) -> list[str]:
    return threads_note(args) if args.engine == "ray" else []


def _recompute_note(out: Path, parts: Path) -> list[str]:
    """An ``--out`` that a finished run wrote is computed again, never reused: say so."""
    if out.exists() and not parts.exists():
        return [f"note: {out} exists (a finished run's output): it is computed again with these flags and replaced"]
    return []


def _summary(rows, out: Path, images: float, seconds: float, ignored: list, extra: str = "") -> int:
    """The last lines of a prediction run; -> the exit status: 2 when every image was skipped."""
    skipped = int((rows["status"] != "ok").sum())
    rate = f", {images / seconds:.1f} img/s" if seconds > 0 and images else ""
    print(f"{len(rows)} rows ({skipped} skipped) -> {out} in {seconds:.1f} s{rate}{extra}")
    report_ignored(ignored)
    return all_skipped(skipped, len(rows), sorted(set(rows["error"].astype(str))))


def report_ignored(ignored: list[tuple[str, str]]) -> None:
    """The files that got no row, with the reason; a folder's many files of one reason as one entry."""
    if not ignored:
        return
    groups: dict[tuple[str, str], list[str]] = {}
    for path, why in ignored:
        groups.setdefault((str(Path(path).parent), why), []).append(path)
    entries = []
    for (folder, why), paths in groups.items():
        if len(paths) > 3 and folder != ".":
            entries.append(f"{folder}/ ({len(paths)} files: {why})")
        else:
            entries += [f"{p} ({why})" for p in paths]
    print(f"{len(ignored)} files ignored (no row): " + "; ".join(entries[:10]) + (" ..." if len(entries) > 10 else ""),
          file=sys.stderr)


def token_pictures(folder: Path, model, names: dict[str, str], class_names: list[str] | None):
    """Callback writing one PNG per predicted image: the crop the model saw, its top-1 class and
    probability, and the tokens each gate (each selection stage of a baseline) kept, named by block."""
    import torch

    from ..data.records import PICTURES_MARKER, mark_output_folder
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from ..io import atomic_write
    from ..viz import token_usage_picture

    mark_output_folder(folder, PICTURES_MARKER)  # never read back as input
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def write(batch: dict, images, usage, logits) -> None:
        b, _, h, w = images.shape
        gh, gw = h // model.config.patch_size, w // model.config.patch_size
        prefix = 1 if model.cls_token is not None else 0
        # per stage the patch rows kept (virtual rows, e.g. EViT's fused tokens, come after the patches)
        masks = [m.bool().view(b, -1)[:, prefix:prefix + gh * gw].reshape(b, gh, gw).cpu() for m in usage.masks]
        blocks = usage.gate_blocks if len(usage.gate_blocks) == len(masks) else range(len(masks))
        probs, top = logits.float().softmax(-1).max(-1)
        for j, name in enumerate(batch["id"]):
            rgb = ((images[j].float().cpu() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            keep = torch.stack([m[j] for m in masks]) if masks else torch.zeros(0, gh, gw, dtype=torch.bool)
            cls = int(top[j])
            label = class_names[cls] if class_names and cls < len(class_names) else f"class {cls}"
            picture = token_usage_picture(rgb, keep, scale=max(1, 256 // max(h, w)), blocks=blocks,
                                          caption=f"predicted: {label} ({float(probs[j]):.1%})")
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
    from ..data.records import PICTURES_MARKER, mark_output_folder, resolve_records
    from ..distributed import shutdown
    from ..inference import detector_job, provenance, run_detection

    if not args.input:
        raise ValueError("--input is required: an image file, a folder of images, a .txt list, a parquet file or a glob")
    validate_inference_args(args)
    from ..inference.dataset_out import is_dataset_out

    if is_dataset_out(args.out):
        raise ValueError(f"--out {args.out}: a data set output is built for classifiers so far; give a detector a "
                         f"file ({', '.join(DETECTOR_FORMATS)})")
    out = Path(args.out)
    check_writable(out)
    check_suffix(out, DETECTOR_FORMATS, "a detector")
    parts = out.with_name(out.name + ".parts")
    vis_dir = Path(args.save_vis) if args.save_vis else None

    def dataset_of(model) -> DetectionImages:
        records = resolve_records(args.input, args.split, [out, parts] + ([vis_dir] if vis_dir else []), args.uri_column)
        return DetectionImages(records, model.config.img_scale, max_pixels=args.max_image_pixels)

    spec = model_spec(args, "detector")
    prepared = detector_job(spec, dataset_of, run_options(args), parts,
                            "predict-detection", args.input, [args.input], args.split, keep_budget(args))
    show(_engine_notes(args) + prepared.messages + _recompute_note(out, parts))
    job, records = prepared.job, prepared.job.dataset.records
    names = None
    if vis_dir is not None:
        from ..detection.vis import save_picture

        mark_output_folder(vis_dir, PICTURES_MARKER)  # never read back as input
        names = picture_names(records.ids)

        def on_batch(batch, dets) -> None:
            for index, name, d in zip(batch["index"], batch["id"], dets):
                save_picture(job.dataset.decoded(index), d, vis_dir / names[name], args.vis_score_thr)

        job.on_batch = on_batch
    try:
        state, (images,), seconds = run_with_progress(
            job, "predict", _run(args, spec, run_detection),
            lambda s: {"fps_w": f"{s.images / max(s.model_seconds, 1e-9):.2f}", "dets": s.detections},
            lambda s: [s.images])
        if not job.dist.is_main:
            return 0
        rows = expand_rows(job.store.merge())
        if names:
            rows["picture"] = [names[i] if ok == "ok" else None for i, ok in zip(rows["id"], rows["status"])]
        model = prepared.built.model
        meta = provenance(prepared.built, spec, data=job.manifest["data"], img_scale=list(model.config.img_scale),
                          class_names=list(model.class_names), calibration=job.manifest["calibration"],
                          engine=args.engine)
        write_rows(rows, out, meta)
        job.store.remove()
        return _summary(rows, out, images, seconds, records.ignored,
                        (f"; pictures in {vis_dir}" if vis_dir else "") + retried_note(state))
    finally:
        shutdown(job.dist)
