"""``nested-svit predict``: offline batch prediction, one row per input file, for classifiers and detectors
(the family follows ``--model`` or what ``--checkpoint`` holds)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import options
from .arguments import CLS, DET, add_inference_options, add_valid_labels_option
from .common import all_skipped, capacity_note
from .engine import add_engine_options, check_engine_args, retried_note, schedule_for, threads_note
from .models import class_names_file, keep_budget, model_spec, show
from .runs import data_options, progress, run_options, validate_inference_args


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
                        "or an object store prefix (s3://bucket/preds/): a partitioned Parquet data set, one part "
                        "per batch, _manifest.json and _SUCCESS at the end")
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


def _output(args: argparse.Namespace, family: str):
    """``OutputOptions`` of ``--out`` / ``--save-vis``, checked for the ``family``'s rows."""
    from ..inference import OutputOptions

    threshold = getattr(args, "vis_score_thr", None)  # detectors' (a classifier's parser has none)
    output = OutputOptions(args.out, pictures=args.save_vis, **({"score_thr": threshold} if threshold is not None else {}))
    output.check(family)
    return output


def predict_classifier(args: argparse.Namespace) -> int:
    from ..inference import Scoring, classifier_job
    from ..inference.spec import bf16_note

    name, checkpoint, demo_input = _demo() if args.demo else (None, None, None)
    source = args.input or demo_input
    if not source:
        raise ValueError("--input is required (or --demo)")
    validate_inference_args(args)
    output = _output(args, CLS)
    spec = model_spec(args, "classifier", name, checkpoint)
    names = class_names_file(args.class_names) or ([str(d) for d in range(10)] if args.demo else None)
    job = classifier_job(spec, data_options(args, source, True), run_options(args), output, "predict",
                         keep_budget(args), topk=args.topk, class_names=names, scoring=Scoring(args.valid_labels))
    show(_engine_notes(args) + job.messages + bf16_note(spec, job.device))
    return _predict(args, job, lambda s: {"img_s": f"{s.images / max(s.elapsed, 1e-9):.1f}"})


def predict_detector(args: argparse.Namespace) -> int:
    from ..inference import detector_job

    if not args.input:
        raise ValueError("--input is required: an image file, a folder of images, a .txt list, a parquet file or a glob")
    validate_inference_args(args)
    output = _output(args, DET)
    job = detector_job(model_spec(args, "detector"), data_options(args, args.input), run_options(args), output,
                       "predict-detection", keep_budget(args))
    show(_engine_notes(args) + job.messages)
    return _predict(args, job, lambda s: {"fps_w": f"{s.images / max(s.model_seconds, 1e-9):.2f}",
                                          "dets": s.detections})


def _predict(args: argparse.Namespace, job, postfix) -> int:
    """Hand the library the job, print its summary (rank 0)."""
    from ..distributed import shutdown
    from ..inference import predict

    try:
        with progress(job, "predict", postfix) as update:
            summary = predict(job, update, schedule_for(args, job))
        if summary is None:
            return 0
        extra = (f"; pictures in {summary.pictures_dir}" if summary.pictures_dir else "") + retried_note(summary.counts)
        if job.spec.capacity:  # every process's and Ray actor's batches of this run
            extra += "; " + capacity_note(job.spec.capacity, int(summary.counts.capacity_reruns))
        rate = f", {summary.images / summary.seconds:.1f} img/s" if summary.seconds > 0 and summary.images else ""
        print(f"{summary.num_rows} rows ({summary.skipped} skipped) -> {summary.out} in {summary.seconds:.1f} s"
              f"{rate}{extra}")
        report_ignored(summary.ignored)
        return all_skipped(summary.skipped, summary.num_rows, summary.reasons())
    finally:
        shutdown(job.dist)


def _engine_notes(args: argparse.Namespace) -> list[str]:
    return threads_note(args) if args.engine == "ray" else []


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
