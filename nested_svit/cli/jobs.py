"""What ``predict`` and ``eval`` share on the command line: the argument checks (one line each, before
any work), the library's run options from the flags, and the one progress bar for classifier and
detector jobs alike (rank 0)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

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

        return RunOptions(args.batch_size, args.workers, "cpu", ray_threads(args))
    return RunOptions(args.batch_size, args.workers, args.device, args.threads)


def data_options(args: argparse.Namespace, path: str, exif: bool, exclude: list):
    """``DataOptions`` of a classifier run's flags: the images at ``path``, EXIF orientation applied or
    not, our own outputs ``exclude``d."""
    from ..inference import DataOptions

    return DataOptions(path, args.split, args.max_image_pixels, exif, args.decode, args.jpeg_draft, args.crop_pct,
                       args.interpolation, tuple(str(p) for p in exclude if p), args.ignore_unknown_classes,
                       args.uri_column, args.mean, args.std)


def run_with_progress(job, label: str, run: Callable, postfix: Callable[[object], dict], totals: Callable[[object], list]
                      ) -> tuple[object, list[float], float]:
    """Run this process's pending batches of ``job`` with a progress bar (rank 0), wait for every
    process. ``run(job, progress)`` -> state; ``postfix(state)``: the bar's figures; ``totals(state)``:
    numbers summed over the processes. -> (state, summed totals, seconds of this run)."""
    from ..distributed import barrier, sum_over_ranks

    job.store.check_manifest()  # a different run's parts: refused before the bar starts
    todo = sum(len(b) for b in job.store.pending())
    done = sum(len(b) for b in job.store.owned()) - todo
    if done and job.dist.is_main:  # a resumed run says so, and its bar starts where the parts end
        print(f"resuming {job.store.parts_dir}: {done} of {job.store.num_records} images already done, {todo} to go",
              file=sys.stderr)
    bar = progress_bar(done + todo, label, enabled=job.dist.is_main, initial=done)

    def progress(state) -> None:
        bar.set_postfix(postfix(state), refresh=False)  # shown with the update, at the bar's pace
        bar.update(done + state.seen - bar.n)

    start = time.perf_counter()
    state = run(job, progress)
    barrier(job.dist)
    seconds = time.perf_counter() - start
    bar.update(done + todo - bar.n)
    bar.close()
    return state, sum_over_ranks(totals(state), job.dist, job.device), seconds
