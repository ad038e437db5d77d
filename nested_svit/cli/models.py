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

    from ..checkpoint import classifier_from_file, file_info, load_checkpoint, release_model
    from ..registry import create_model, eval_defaults, get_config

    info = file_info(args.checkpoint)
    carried = info.kind == "classifier"
    if carried and args.model and info.model_name and args.model != info.model_name:
        raise ValueError(f"--model {args.model} but {args.checkpoint} holds a trained {info.model_name}; drop --model")
    release = release_model(args.checkpoint) if not carried and args.model is None else None
    name = (info.model_name if carried else None) or args.model or (release[0] if release else "svit_small")
    try:
        defaults = eval_defaults(name)
    except ValueError:
        defaults = {"img_size": None, "crop_pct": 0.875}
    overrides: dict = dict(release[1]) if release else {}
    if release:
        note(f"{args.checkpoint} is {release[2]} (its training args): running {name} configured so")
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


def build_detector(args: argparse.Namespace, categories: list[str] | None = None):
    """The detector of ``args.model`` (or the config its checkpoint carries) with weights loaded, before
    any image is read, for inference: a file without detector heads (a classification checkpoint) is
    refused. ``categories``: an annotation file's class names (``eval coco``); the detector predicts them
    unless its checkpoint predicts another number of classes (``eval coco`` then maps them by name or
    COCO id). -> (model, load report or None)."""
    from dataclasses import replace

    import torch

    from ..checkpoint import load_checkpoint
    from ..detection import create_detector
    from ..detection.checkpoint import checkpoint_classes, checkpoint_kind, detector_from_file
    from ..detection.detector import MaskRCNNDetector

    if args.checkpoint and checkpoint_kind(args.checkpoint) == "imagenet":
        name = args.model or "the detector"
        raise ValueError(f"{args.checkpoint} is a classification checkpoint: it holds a ViT backbone only, so "
                         f"{name}'s adapter, FPN, RPN and RoI heads would be random. Give a detector checkpoint "
                         "(official SViT / ViT-Adapter mmdet file, or one 'nested-svit train' wrote), or train one "
                         f"from this file: nested-svit train --model {args.model or 'svit_adapter_small_maskrcnn'} "
                         f"--init {args.checkpoint} ...")
    carried = detector_from_file(args.checkpoint)
    classes = checkpoint_classes(args.checkpoint)
    overrides: dict = {}
    scale = parse_img_scale(args.img_scale)
    if scale:
        overrides["img_scale"] = scale
    if categories is not None and classes in (None, len(categories)):
        overrides["num_classes"], overrides["class_names"] = len(categories), tuple(categories)
    elif classes is not None and carried is None:
        overrides["num_classes"] = classes
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


def first_decodable(dataset, count: int, key: str = "image") -> list:
    """The first ``count`` decodable items' ``key`` of ``dataset`` (never raising for bad files)."""
    found = []
    for i in range(len(dataset)):
        value = dataset[i][key]
        if value is not None:
            found.append(value)
        if len(found) == count:
            break
    return found


def calibrate(args: argparse.Namespace, stack, images_of, device: str, save) -> dict | None:
    """``--calibrate N [--keep-targets T] [--calibrate-data DIR]``: shift the gate thresholds of ``stack``
    (the classifier, or the detector's backbone) so the keep fractions on N images hit the targets (no
    retraining). ``images_of(source, n)``: the first n decodable model inputs of a data source;
    ``save(path, calibration)`` writes ``--save-calibrated``. -> what was done, for the outputs."""
    if args.keep_targets and not args.calibrate:
        raise ValueError("--keep-targets needs --calibrate N (the number of images to calibrate the gates on)")
    if not args.calibrate:
        return None
    if args.calibrate < 1:
        raise ValueError(f"--calibrate must be >= 1 images, got {args.calibrate}")
    if stack.num_gates == 0 or stack.method.calibrate is None:
        raise ValueError(f"{args.model} has no gates to calibrate (--calibrate shifts SViT gate thresholds; "
                         f"{stack.method.title} keeps its own counts)")
    targets = keep_targets_from_cli(args.keep_targets, stack.config.keep_targets) if args.keep_targets \
        else list(stack.config.keep_targets)
    source = args.calibrate_data or args.data
    images = images_of(source, args.calibrate)
    if not images:
        raise ValueError(f"no decodable images in {source} to calibrate on")
    reached = stack.calibrate_keep([t.to(device, stack.dtype) for t in images], targets)
    result = {"images": len(images), "data": str(source), "targets": targets, "reached": [round(r, 4) for r in reached]}
    warn(f"calibrated gates on {len(images)} images: keep fractions {', '.join(f'{r:.3f}' for r in reached)}")
    if args.save_calibrated:
        save(args.save_calibrated, result)
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


def actor_model(family: str, flags: dict, device: str):
    """The model a run's flags describe, built again where it runs (a Ray actor): checkpoint read from
    its path, on ``device`` in the run's precision and backend. ``flags``: the run's parsed flags after
    the driver resolved them (``vars(args)``, plain values only)."""
    from ..benchmark.harness import PRECISIONS

    args = argparse.Namespace(**flags)
    model, _ = build_detector(args) if family == "detector" else build_classifier(args)
    return model.to(device, PRECISIONS[args.precision]).eval().set_execution("packed", args.backend)


__all__ = ["family_of", "actor_model", "build_classifier", "build_detector", "calibrate", "save_classifier",
           "model_class_names", "load_init", "note"]
