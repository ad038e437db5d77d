"""Inference jobs of ``predict`` and ``eval``: the model, its checkpoint (read and checked before any
image), the data set, the manifest that ties part files to the run, the process group; and the one
progress runner for classifier and detector jobs alike."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from . import options
from .common import check_writable, progress_bar, resolve_device
from .models import build_classifier, calibrate, first_decodable, model_class_names, save_classifier


def validate_inference_args(args: argparse.Namespace) -> None:
    """Every argument error a user can make, before any work starts (one line each)."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if getattr(args, "topk", 1) < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    if getattr(args, "crop_pct", None) is not None and not 0 < args.crop_pct <= 1:
        raise ValueError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if getattr(args, "img_size", None) is not None and args.img_size < 1:
        raise ValueError(f"--img-size must be positive, got {args.img_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    check_writable(Path(args.out))


def process_group(args: argparse.Namespace):
    """(device of this process, ``DistInfo``): joins the torchrun group when there is one; the math
    settings (TF32 off) that the outputs record (``run_settings``)."""
    import torch

    from ..devices import set_kernel_settings
    from ..distributed import init_from_env, rank_device

    set_kernel_settings(False)
    device = resolve_device(args.device)
    info = init_from_env(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    return rank_device(device, info), info


def prepare_classifier_job(args: argparse.Namespace, parts_dir: Path, kind: str):
    """Model + checkpoint (read and checked before any image), data set, manifest, process group."""
    import torch

    from ..benchmark.harness import PRECISIONS
    from ..data import EvalTransform, open_dataset
    from ..evaluation import InferenceJob

    options.resolve(args, "classifier", args.model)  # (already resolved by the command: a no-op then)
    validate_inference_args(args)
    model, report = build_classifier(args)
    device, info = process_group(args)
    model.to(device, PRECISIONS[args.precision]).eval().set_execution("packed", args.backend)
    transform = EvalTransform(img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation)
    outputs = [args.out, parts_dir] + ([args.save_vis] if getattr(args, "save_vis", None) else [])
    draft = (transform.resize_to, transform.resize_to) if args.jpeg_draft else None
    dataset = open_dataset(args.data, transform.crop, split=args.split, exclude=outputs, exif=kind == "predict",
                           max_pixels=args.max_image_pixels, draft=draft, encoded_jpegs=args.decode == "gpu")
    decoder = None
    if args.decode == "gpu":
        from ..data.device_decode import DeviceJpegDecoder
        from ..devices import is_cuda

        decoder = DeviceJpegDecoder(transform, device, dataset.exif, args.max_image_pixels)
        if not is_cuda(device) and getattr(args, "engine", "local") == "local":  # Ray: each actor's own device
            print(f"note: --decode gpu on {device}: JPEGs are decoded in this process by {decoder.name} (there is "
                  "no GPU decoder here); --decode cpu decodes in the --workers processes", file=sys.stderr)
    class_names = model_class_names(args, model)

    def images_of(source, n: int) -> list:
        return first_decodable(open_dataset(source, transform, split=args.split, exclude=[args.out]), n)

    calibration = calibrate(args, model, images_of, device,
                            lambda path, result: save_classifier(model, path, calibration=result))
    if dataset.records.label_source == "sorted_class_dirs" and model.config.num_classes == 1000:
        print(f"WARNING: {args.data}: class folders are not (all) ImageNet wnids, so labels are the sorted folder "
              "order 0..K-1, not ImageNet's class ids: top-1/top-5 against a 1000-class model are meaningless. "
              "Name folders by wnid (n01440764, ...) or use a model trained on these classes.", file=sys.stderr)
    manifest = {"kind": kind, "model": args.model, "checkpoint_sha256": report.sha256 if report else None,
                "data": str(Path(args.data).resolve()), "num_records": len(dataset), "batch_size": args.batch_size,
                "topk": args.topk, "transform": transform.describe(), "precision": args.precision,
                "img_size": args.img_size, "seed": args.seed if report is None else None,
                "files_digest": dataset.records.digest(), "split": args.split, "calibration": calibration,
                "decode": decoder.name if decoder else "pil", "jpeg_draft": draft}
    job = InferenceJob(model, dataset, parts_dir, manifest, args.batch_size, args.workers, args.topk,
                       torch.device(device), info, class_names, transform=transform, decoder=decoder)
    return job, report


def prepare_detector_job(args: argparse.Namespace, parts_dir: Path, kind: str, dataset, model, report):
    """The detection job of ``dataset`` with ``model`` on this process's device, its keep budget
    calibrated when asked (``--calibrate``); ``job.manifest["calibration"]`` records it."""
    import torch

    from ..data.coco import DetectionImages
    from ..data.records import resolve_records
    from ..detection.checkpoint import save_detector_checkpoint
    from ..evaluation.detection import DetectionJob

    from ..benchmark.harness import PRECISIONS

    device, info = process_group(args)
    model.to(device, PRECISIONS[args.precision]).eval().set_execution("packed", args.backend)

    def images_of(source, n: int) -> list:
        if source == args.data:
            return first_decodable(dataset, n, "input")
        return first_decodable(DetectionImages(resolve_records(source, args.split), model.config.img_scale), n, "input")

    calibration = calibrate(args, model.backbone, images_of, device,
                            lambda path, result: save_detector_checkpoint(model, path, calibration=result))
    manifest = {"kind": kind, "model": model.name, "checkpoint_sha256": report.sha256 if report else None,
                "data": [str(Path(f).resolve()) for f in (args.data_files or [])], "num_records": len(dataset),
                "batch_size": args.batch_size, "img_scale": list(model.config.img_scale),
                "seed": args.seed if report is None else None, "calibration": calibration,
                "files_digest": dataset.records.digest(), "precision": args.precision}
    return DetectionJob(model, dataset, parts_dir, manifest, args.batch_size, args.workers, torch.device(device), info)


def run_settings() -> dict:
    """The kernel settings a run's numbers depend on (``devices.kernel_settings``, the varlen kernel)."""
    from ..attention import varlen_kernel
    from ..devices import kernel_settings

    return {**kernel_settings(), "varlen_kernel": varlen_kernel()}


def run_with_progress(job, label: str, run: Callable, postfix: Callable[[object], dict], totals: Callable[[object], list]
                      ) -> tuple[object, list[float], float]:
    """Run this process's pending batches of ``job`` with a progress bar (rank 0), wait for every
    process. ``run(job, progress)`` -> state; ``postfix(state)``: the bar's figures; ``totals(state)``:
    numbers summed over the processes. -> (state, summed totals, seconds of this run)."""
    from ..distributed import barrier, sum_over_ranks
    from ..evaluation.runner import pending_batches

    todo = sum(len(b) for b in pending_batches(job))
    bar = progress_bar(todo, label, enabled=job.dist.is_main)

    def progress(state) -> None:
        bar.update(state.seen - bar.n)
        bar.set_postfix(postfix(state))

    start = time.perf_counter()
    state = run(job, progress)
    barrier(job.dist)
    seconds = time.perf_counter() - start
    bar.update(todo - bar.n)
    bar.close()
    return state, sum_over_ranks(totals(state), job.dist, job.device), seconds
