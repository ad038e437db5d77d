"""``nested-svit list``: the classifiers, detectors and pruning methods this version knows, one line each."""
from __future__ import annotations

import argparse


def add_parser(sub, formatter) -> None:
    about = "the models, detectors and pruning methods this version knows, one line each"
    p = sub.add_parser("list", help=about, description=about, formatter_class=formatter)
    p.add_argument("what", nargs="?", default="all", choices=["all", "models", "detectors", "methods"],
                   help="what to list")
    p.set_defaults(func=cmd_list)


def _describe(config) -> str:
    from ..methods import get_method

    method = get_method(config.method)
    if not config.gate_blocks:
        return "dense"
    return f"{method.title}, acting at blocks {','.join(map(str, config.gate_blocks))}"


def cmd_list(args: argparse.Namespace) -> int:
    from ..detection.registry import get_detector_config, list_detectors
    from ..methods import METHODS
    from ..registry import get_config, list_models

    if args.what in ("all", "models"):
        for name in list_models():
            cfg = get_config(name)
            print(f"model     {name:34s} {cfg.embed_dim}-d, {cfg.img_size}px, {cfg.num_classes} classes, {_describe(cfg)}")
    if args.what in ("all", "detectors"):
        for name in list_detectors():
            cfg = get_detector_config(name)
            print(f"detector  {name:34s} Mask R-CNN, {cfg.vit.embed_dim}-d ViT-Adapter, {_describe(cfg.vit)}")
    if args.what in ("all", "methods"):
        for method in METHODS.values():
            trains = f"trains ({method.train_execution} execution)" if method.train_execution else "inference only"
            extra = ", calibratable keep budget" if method.calibrate is not None else ""
            print(f"method    {method.name:34s} {method.title}: {trains}{extra}")
    return 0
