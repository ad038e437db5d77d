"""What ``predict`` and ``eval`` share on the command line: the argument checks (one line each, before
any work), the library's run, data and output options from the flags, and the one progress bar for
classifier and detector jobs alike (rank 0)."""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Callable, Iterator

from .common import check_writable, progress_bar


def validate_inference_args(args: argparse.Namespace) -> None:
    """Every argument error a user can make, before any work starts (one line each)."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if getattr(args, "topk", 1) < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    if getattr(args, "crop_pct", None) is not None and not 0 < args.crop_pct <= 1:
        raise ValueError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if getattr(args, "std", None) is not None and not all(v > 0 for v in args.std):
        raise ValueError(f"--std must be positive, got {','.join(map(str, args.std))}")
    if getattr(args, "img_size", None) is not None and args.img_size < 1:
        raise ValueError(f"--img-size must be positive, got {args.img_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads} (leave it out for torch's default)")
    if args.max_image_pixels is not None and args.max_image_pixels < 1:
        raise ValueError(f"--max-image-pixels must be >= 1, got {args.max_image_pixels}")
    from ..data.objectstore import is_uri

    if is_uri(args.out):
        if not args.out.endswith("/"):
            raise ValueError(f"--out {args.out}: in object storage the output is a Parquet data set: end it with / "
                             "(s3://bucket/preds/)")
    else:
        check_writable(Path(args.out), folder=str(args.out).endswith(("/", "\\")))


def run_options(args: argparse.Namespace):
    """``RunOptions`` of the flags. With ``--engine ray`` the driver runs on the CPU (each actor on its own
    device) and the rows' torch threads are the actors' (``engine.ray_threads``)."""
    from ..inference import RunOptions

    if getattr(args, "engine", "local") == "ray":
        from .engine import ray_threads

        return RunOptions(args.batch_size, args.workers, "cpu", ray_threads(args), engine="ray")
    return RunOptions(args.batch_size, args.workers, args.device, args.threads)


def data_options(args: argparse.Namespace, path: str, exif: bool = False, exclude: list = (), **more):
    """``DataOptions`` of a run's flags: the images at ``path``, EXIF orientation applied or not, other
    outputs of ours ``exclude``d; ``more``: other fields (a COCO ``annotations`` file, ``max_images``).
    A detector's parser has no transform or decoding flags: those stay the library's defaults."""
    from ..inference import DataOptions

    flags = {"split": "split", "max_pixels": "max_image_pixels", "decode": "decode", "jpeg_draft": "jpeg_draft",
             "crop_pct": "crop_pct", "interpolation": "interpolation", "mean": "mean", "std": "std",
             "ignore_unknown_classes": "ignore_unknown_classes", "uri_column": "uri_column"}
    given = {field: getattr(args, flag) for field, flag in flags.items() if getattr(args, flag, None) is not None}
    return DataOptions(path, exif=exif, exclude=tuple(str(p) for p in exclude if p), **given, **more)


@contextlib.contextmanager
def progress(job, label: str, postfix: Callable[[object], dict]) -> Iterator[Callable]:
    """A progress bar over ``job`` (rank 0) -> the callback for ``Job.run``. Opening the job checks its run
    record and lists its pending batches (once per run); a resumed run says so, and its bar starts where
    the parts end. ``postfix(counts)``: the bar's figures."""
    from .models import show

    resume = job.open()
    show(resume.notes)
    bar = progress_bar(resume.done + resume.todo, label, enabled=job.dist.is_main, initial=resume.done)

    def update(counts) -> None:
        bar.set_postfix(postfix(counts), refresh=False)  # shown with the update, at the bar's pace
        bar.update(resume.done + counts.seen - bar.n)

    try:
        yield update
        bar.update(resume.done + resume.todo - bar.n)
    finally:
        bar.close()
