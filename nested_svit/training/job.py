"""A training run built as an inference run is: from a ``ModelSpec`` (the model's name, ``checkpoint``: where
training starts (``--init``), classes, input size or scale, the seed of what the file does not hold), the
``DataOptions`` of its data (a labelled image set; detectors: a COCO annotation file with its images) and
``RunOptions`` (device, threads: the one process set-up, torchrun joined) -> a trainer ready to ``fit`` and
the lines a user should read. Nothing here prints."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..distributed import process_setup
from ..inference import DataOptions, ModelSpec, RunOptions
from .classifier import Trainer, TrainConfig
from .detector import DetectorTrainer, DetTrainConfig
from .init import load_init


@dataclass
class TrainingJob:
    """A trainer ready to ``fit`` (``resume`` first to continue a run) and what a user should read."""

    trainer: Trainer | DetectorTrainer
    messages: list[str] = field(default_factory=list)


def _no_init_note(name: str, lr: float, selector_lr: float | None, detector: bool) -> str:
    if detector:
        return (f"note: no --init: the whole of {name} starts from random weights (lr {lr:g}); detectors usually "
                "start from ImageNet weights: --init deit_small_patch16_224.pth")
    return (f"note: no --init: {name} starts from random weights and trains at lr {lr:g} (gates {selector_lr:g}), the "
            "gate fine-tuning defaults; from scratch it usually wants a larger --lr, or start from a dense checkpoint "
            "with --init")


def classifier_training(spec: ModelSpec, data: DataOptions, run: RunOptions, out: str | Path, settings: dict,
                        pruning: dict | None = None, resuming: bool = False, log_every: int = 10) -> TrainingJob:
    """A classifier trained on the labelled images at ``data.path`` (class folders, parquet or Arrow), saved to
    ``out``. ``settings``: ``TrainConfig`` fields (None: its default); ``pruning``: the model's pruning options
    (``reactivation``, ``gate_tau``); ``resuming``: the run continues a checkpoint (its weights, not ``--init``'s)."""
    from ..checkpoint import file_info
    from ..data import open_dataset
    from ..registry import build_model
    from .data import LabelledImages, train_augment

    device, _ = process_setup(run.device, run.threads)
    images = LabelledImages(open_dataset(data.path), data.path)
    messages = [f"note: {images.unlabelled} files outside class folders have no label and are not trained on"] \
        if images.unlabelled else []
    if spec.num_classes is not None and spec.num_classes < images.num_classes:
        raise ValueError(f"--num-classes {spec.num_classes}, but the data has labels up to {images.num_classes - 1} "
                         f"({images.num_classes} classes)")
    init_cfg = file_info(spec.checkpoint).model_config if spec.checkpoint else None
    num_classes = spec.num_classes or (init_cfg or {}).get("num_classes") or images.num_classes
    torch.manual_seed(spec.seed)  # the initialisation (head, gates without --init) depends on the seed only
    model = build_model(spec.name, **(pruning or {}), num_classes=num_classes,
                        **({"img_size": spec.img_size} if spec.img_size else {}))
    folders = images.dataset.records.class_names
    if folders and len(folders) == num_classes:
        model.class_names = list(folders)
    if model.config.img_size % model.config.patch_size:
        raise ValueError(f"--img-size {model.config.img_size} is not a multiple of the patch size "
                         f"{model.config.patch_size}")
    if spec.checkpoint:
        messages += [f"note: {text}" for text in load_init(model, spec.checkpoint)]
    cfg = TrainConfig(**{k: v for k, v in settings.items() if v is not None}, device=str(device))
    if not spec.checkpoint and not resuming:
        messages.append(_no_init_note(model.name, cfg.lr, cfg.selector_lr, detector=False))
    trainer = Trainer(model, images, cfg, augment=train_augment(model.config.img_size), checkpoint_path=out,
                      data_record=images.record(str(Path(data.path).resolve())), log_every=log_every)
    return TrainingJob(trainer, messages)


def detector_training(spec: ModelSpec, data: DataOptions, run: RunOptions, out: str | Path, settings: dict,
                      pruning: dict | None = None, resuming: bool = False, log_every: int = 10, flip: float = 0.5,
                      multiscale: bool = False) -> TrainingJob:
    """A detector trained on COCO-format data (``data.annotations``, its images in ``data.path``), saved to
    ``out``, with mmdet's recipe for it (``DetTrainConfig.recipe``; ``settings`` given override it). ``flip``:
    horizontal flip probability; ``multiscale``: the official multi-scale + random-crop augmentation."""
    from ..data.coco import CocoTrainData, load_coco
    from ..detection import create_detector

    if not 0 <= flip <= 1:
        raise ValueError(f"--flip must be a probability, got {flip}")
    device, _ = process_setup(run.device, run.threads)
    coco = load_coco(data.annotations)
    names = [coco.loadCats(c)[0]["name"] for c in sorted(coco.getCatIds())]
    if spec.num_classes is not None and spec.num_classes != len(names):
        raise ValueError(f"--num-classes {spec.num_classes}, but {data.annotations} has {len(names)} categories")
    overrides: dict = {"num_classes": len(names), "class_names": tuple(names), **(pruning or {})}
    if spec.img_scale:
        overrides["img_scale"] = tuple(spec.img_scale)
    torch.manual_seed(spec.seed)
    model = create_detector(spec.name, **overrides)
    messages = [f"note: {text}" for text in load_init(model, spec.checkpoint)] if spec.checkpoint else []
    cfg = DetTrainConfig.recipe(model, spec.checkpoint is not None, **settings, device=str(device))
    images = CocoTrainData(data.annotations, data.path, model.config.img_scale, flip=flip, seed=cfg.seed,
                           multiscale=multiscale)
    if images.left_out:
        messages.append(f"note: {images.left_out} images without usable annotations are left out (as mmdet's "
                        "filter_empty_gt)")
    if not spec.checkpoint and not resuming:
        messages.append(_no_init_note(model.name, cfg.lr, None, detector=True))
    record = {"path": str(Path(data.annotations).resolve()), "digest": images.digest(), "images": len(images)}
    trainer = DetectorTrainer(model, images, cfg, checkpoint_path=out, data_record=record, log_every=log_every)
    return TrainingJob(trainer, messages)
