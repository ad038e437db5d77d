"""From parsed flags to the library's plain descriptions: the ``ModelSpec`` of a run, the keep budget,
the class names a file lists; and the lines the library returns, shown once (rank 0)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .common import keep_budget_values, parse_img_scale


def model_spec(args: argparse.Namespace, family: str, name: str | None = None, checkpoint: str | None = None,
               **settings):
    """The ``ModelSpec`` of ``args`` (``name`` / ``checkpoint``: in place of ``--model`` / ``--checkpoint``,
    e.g. the bundled demo model); ``settings``: more spec fields (a detector's ``categories``)."""
    from ..inference import ModelSpec

    values = {"precision": args.precision, "backend": args.backend, "seed": args.seed,
              "compile": getattr(args, "compile", False), "capacity": getattr(args, "capacity", None),
              "cuda_graphs": getattr(args, "cuda_graphs", False), "agreement_with": getattr(args, "agreement_with", None),
              "random_weights": args.random_weights, "num_classes": getattr(args, "num_classes", None),
              "img_size": getattr(args, "img_size", None), "img_scale": parse_img_scale(getattr(args, "img_scale", None)),
              **settings}
    return ModelSpec(family, name or args.model, checkpoint or args.checkpoint, **values)


def keep_budget(args: argparse.Namespace):
    """``--calibrate N [--keep-targets T] [--calibrate-data DIR] [--save-calibrated FILE]`` -> ``KeepBudget``."""
    from ..inference import KeepBudget

    return KeepBudget(args.calibrate, **keep_budget_values(args.keep_targets), data=args.calibrate_data,
                      save_to=args.save_calibrated)


def class_names_file(path: str | None) -> list[str] | None:
    """``--class-names FILE``: one name a line (blank lines left out)."""
    if not path:
        return None
    return [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]


def show(lines: list[str]) -> None:
    """The library's notes and warnings, on stderr, once per run (rank 0 under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        for line in lines:
            print(line, file=sys.stderr)


__all__ = ["model_spec", "keep_budget", "class_names_file", "show"]
