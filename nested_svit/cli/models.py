"""Models for the commands: which family a run is, the classifier or detector its flags and checkpoint
describe (weights loaded before any image is read), calibration of the keep budget, class names."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import keep_targets_from_cli, note, parse_img_scale, warn


def family_of(model: str | None, checkpoint: str | None) -> str:
    """``detector`` for a detector name, or no name and a checkpoint holding a detector; else ``classifier``."""
    from ..detection.checkpoint import detector_from_file
    from ..detection.registry import is_detector

    if is_detector(model) or (model is None and detector_from_file(checkpoint) is not None):
        return "detector"
    return "classifier"


def _random_gates_warning(model, report) -> None:
    """A pruned model whose checkpoint had no selector weights prunes at random: say so, and how to fix it."""
    stack = model.backbone if hasattr(model, "backbone") else model
    if report is None or not stack.num_gates:
        return
    if report.format != "imagenet" and not any("gates keep their initialisation" in n for n in report.notes):
        return
    method = stack.method
    fix = "fine-tune with 'nested-svit train'" if method.train_execution else "use its authors' release weights"
    text = (f"warning: the checkpoint has no {method.title} selector weights, so the gates of this {method.title} "
            f"model are random: pruning is arbitrary. Use a {method.title} checkpoint, {fix}, or run the dense model")
    report.notes.append(text)
    warn(text)


def build_classifier(args: argparse.Namespace):
    """The classifier of ``args`` with its checkpoint loaded: the model name and config a ``train``
    checkpoint carries win over flags that were not given. Sets ``args.img_size`` / ``args.crop_pct``
    to what is used. -> (model, load report or None)."""
    import torch

    from ..checkpoint import classifier_from_file, file_info, load_checkpoint
    from ..registry import create_model, eval_defaults, get_config

    info = file_info(args.checkpoint)
    carried = info.kind == "classifier"
    if carried and args.model and info.model_name and args.model != info.model_name:
        raise ValueError(f"--model {args.model} but {args.checkpoint} holds a trained {info.model_name}; drop --model")
    name = (info.model_name if carried else None) or args.model or "svit_small"
    try:
        defaults = eval_defaults(name)
    except ValueError:
        defaults = {"img_size": None, "crop_pct": 0.875}
    overrides: dict = {}
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    torch.manual_seed(args.seed)  # --random-weights runs are reproducible (and resumable)
    if carried:
        model = classifier_from_file(args.checkpoint, **overrides)
        model.name = name
    else:
        get_config(name)  # unknown names fail here with the list of models
        model = create_model(name, **overrides)
    args.model = name
    args.img_size = model.config.img_size if args.img_size is None else args.img_size
    args.crop_pct = args.crop_pct if args.crop_pct is not None else defaults["crop_pct"]
    if args.img_size % model.config.patch_size:
        raise ValueError(f"--img-size {args.img_size} is not a multiple of the patch size {model.config.patch_size}")
    report = load_checkpoint(model, args.checkpoint) if args.checkpoint else None
    if report is None and not args.random_weights:
        raise ValueError("--checkpoint is required (or pass --random-weights to run an untrained model)")
    _random_gates_warning(model, report)
    return model, report


def build_detector(args: argparse.Namespace, num_classes: int | None = None, class_names: list[str] | None = None):
    """The detector of ``args.model`` (or the config its checkpoint carries) with weights loaded, before
    any image is read. -> (model, load report or None)."""
    from dataclasses import replace

    import torch

    from ..checkpoint import load_checkpoint
    from ..detection import create_detector
    from ..detection.checkpoint import detector_from_file
    from ..detection.detector import MaskRCNNDetector

    carried = detector_from_file(args.checkpoint)
    overrides: dict = {}
    scale = parse_img_scale(args.img_scale)
    if scale:
        overrides["img_scale"] = scale
    if num_classes is not None and (carried is None or carried[1].num_classes != num_classes):
        overrides["num_classes"] = num_classes
    if class_names:
        overrides["class_names"] = tuple(class_names)
    torch.manual_seed(args.seed)
    if carried is not None:
        name, cfg = carried
        model = MaskRCNNDetector(replace(cfg, **overrides))
        model.name = name or args.model
    else:
        model = create_detector(args.model or "svit_adapter_small_maskrcnn", **overrides)
    report = load_checkpoint(model, args.checkpoint) if args.checkpoint else None
    if report is None and not args.random_weights:
        raise ValueError("--checkpoint is required (or pass --random-weights to run an untrained model)")
    _random_gates_warning(model, report)
    return model, report


def calibrate(args: argparse.Namespace, model, transform, device: str) -> dict | None:
    """``--calibrate N [--keep-targets T] [--calibrate-data DIR]``: shift the gate thresholds so the
    keep fractions on N images hit the targets (no retraining); ``--save-calibrated`` keeps the result."""
    import torch

    from ..data import open_dataset

    if args.keep_targets and not args.calibrate:
        raise ValueError("--keep-targets needs --calibrate N (the number of images to calibrate the gates on)")
    if not args.calibrate:
        return None
    if args.calibrate < 1:
        raise ValueError(f"--calibrate must be >= 1 images, got {args.calibrate}")
    if model.num_gates == 0 or model.method.calibrate is None:
        raise ValueError(f"{args.model} has no gates to calibrate (--calibrate shifts SViT gate thresholds; "
                         f"{model.method.title} keeps its own counts)")
    targets = keep_targets_from_cli(args.keep_targets, model.config.keep_targets) if args.keep_targets \
        else list(model.config.keep_targets)
    source = args.calibrate_data or args.data
    data = open_dataset(source, transform, split=args.split, exclude=[args.out])
    images = []
    for i in range(len(data)):
        item = data[i]
        if item["image"] is not None:
            images.append(item["image"])
        if len(images) == args.calibrate:
            break
    if not images:
        raise ValueError(f"no decodable images in {source} to calibrate on")
    reached = model.calibrate_keep(torch.stack(images).to(device, model.dtype), targets)
    result = {"images": len(images), "data": str(source), "targets": targets, "reached": [round(r, 4) for r in reached]}
    warn(f"calibrated gates on {len(images)} images: keep fractions {', '.join(f'{r:.3f}' for r in reached)}")
    if args.save_calibrated:
        save_classifier(model, args.save_calibrated, calibration=result)
    return result


def save_classifier(model, path: str | Path, **extra) -> None:
    """A classifier in the one file schema (``checkpoint/writer.py``): loads with ``--checkpoint``."""
    from dataclasses import asdict

    from ..checkpoint import write_checkpoint

    write_checkpoint(path, "classifier", model.name, asdict(model.config), model.state_dict(),
                     class_names=getattr(model, "class_names", None), block_norm_eps=float(model.blocks[0].norm1.eps),
                     **extra)


def model_class_names(args: argparse.Namespace, model) -> list[str] | None:
    """Names of the model's outputs: --class-names, else those its checkpoint carries, else ImageNet's
    for a 1000-class model, else none (ids only). Never the data's folder names."""
    from ..data.classes import imagenet_classes

    k = model.config.num_classes
    if args.class_names:
        names = [ln.strip() for ln in Path(args.class_names).read_text().splitlines() if ln.strip()]
        if len(names) != k:
            raise ValueError(f"--class-names lists {len(names)} names, the model has {k} classes")
        return names
    carried = getattr(model, "class_names", None)
    if carried:
        return list(carried)
    return list(imagenet_classes()[1]) if k == 1000 else None


def load_init(model, path: str) -> list[str]:
    """``train --init``: load weights; a classification head of another size (e.g. ImageNet's 1000
    classes for 3 folders) is re-initialised, with a note."""
    from ..checkpoint import CheckpointError, load_checkpoint, read

    try:
        return load_checkpoint(model, path).notes
    except CheckpointError as e:
        state = read(path).state
        head = {k for k in ("head.weight", "head.bias") if k in state and state[k].shape != model.state_dict()[k].shape}
        if not head:
            raise
        rest = {k: v for k, v in state.items() if k not in head}
        notes = load_checkpoint(model, rest, strict=False).notes
        missing = set(model.state_dict()) - set(rest) - {"head.weight", "head.bias"}
        if missing - {k for k in missing if k.startswith("gates.")}:
            raise e
        return notes + [f"head re-initialised: the checkpoint's head has {state['head.weight'].shape[0]} classes, "
                        f"the model {model.config.num_classes}"]


__all__ = ["family_of", "build_classifier", "build_detector", "calibrate", "save_classifier", "model_class_names",
           "load_init", "note"]
