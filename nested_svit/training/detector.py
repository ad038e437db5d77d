"""Detector training (the paper's detection recipe, mmdet-style): AdamW, linear warm-up, step or cosine
decay, a separate gate learning rate, gradient clipping, bf16 autocast on CUDA; the losses are the
detector's own (``MaskRCNNDetector.losses``: each head's, plus the method's keep-ratio loss in its
training execution). Checkpoints resume exactly (model, optimizer, scheduler, RNG, epoch, step; data
order and flips depend only on (seed, epoch, index)) and load as detector weights directly
(``load_checkpoint``, ``eval coco``, ``predict``): the model config travels in the file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..data.coco import collate_train
from ..detection.detector import MaskRCNNDetector
from ..distributed import all_ranks
from ..devices import autocast
from .base import TrainerBase
from .config import TrainingConfig
from .loop import optimizer_step
from .optim import mmdet_factor


@dataclass
class DetTrainConfig(TrainingConfig):
    """mmdet's recipe: AdamW, a linear warm-up from ``warmup_ratio`` over ``warmup_steps``, x0.1 at each
    of ``steps`` (epochs) or cosine; ``recipe`` fills in the official defaults of a detector."""

    epochs: int = 12
    batch_size: int = 2
    lr: float = 1e-4  # dense ViT-Adapter: 1e-4; SViT fine-tune from a dense detector: 1e-5 (``recipe``)
    gate_lr: float | None = None  # None: lr
    warmup_steps: int = 500  # mmdet: 500 iters from ratio 0.001
    warmup_ratio: float = 0.001
    schedule: str = "step"  # "step": x0.1 at each of ``steps`` (epochs); "cosine"
    steps: tuple[int, ...] = (8, 11)
    clip_grad: float | None = None  # max gradient norm
    sync_bn: bool = True  # under torchrun: the adapter's BatchNorm statistics over all ranks (mmdet's SyncBN)

    @classmethod
    def recipe(cls, model: MaskRCNNDetector, from_checkpoint: bool, **given) -> "DetTrainConfig":
        """The official defaults for ``model``, overridden by ``given`` (None values count as not given):
        a pruned detector fine-tuned from a checkpoint (``--init``) trains at lr 1e-5 and weight decay
        1e-6 (the SViT recipe), any other at lr 1e-4, 0.05; stochastic depth 0.1 for tiny, 0.2 for
        small backbones (the official configs)."""
        fine_tune = model.backbone.prunes and from_checkpoint
        defaults = {"lr": 1e-5 if fine_tune else cls.lr, "weight_decay": 1e-6 if fine_tune else cls.weight_decay,
                    "drop_path": 0.1 if model.config.vit.embed_dim <= 192 else 0.2}
        return cls(**{**defaults, **{k: v for k, v in given.items() if v is not None}})


@dataclass
class DetStepLog:
    epoch: int
    step: int
    losses: dict
    keep: list
    lr: float
    skipped: int = 0


class DetectorTrainer(TrainerBase):
    """Trains a detector on COCO-format ``data`` (``data.coco.CocoTrainData``) with mmdet's recipe."""

    selector_prefix = "backbone.gates."
    no_decay = ("pos_embed", "level_embed")
    collate = staticmethod(collate_train)

    def __init__(self, model: MaskRCNNDetector, data, cfg: DetTrainConfig, checkpoint_path: str | Path | None = None,
                 data_record: dict | None = None, log_every: int = 10):
        if cfg.schedule not in ("step", "cosine"):
            raise ValueError(f"schedule must be 'step' or 'cosine', not {cfg.schedule!r}")
        super().__init__(model, data, cfg, checkpoint_path, data_record, log_every)

    @staticmethod
    def stack_of(model: MaskRCNNDetector):
        return model.backbone

    def lr_factor(self, total_steps: int) -> Callable[[int], float]:
        cfg = self.cfg
        return lambda step: mmdet_factor(step, total_steps, cfg.warmup_steps, cfg.warmup_ratio, cfg.schedule, cfg.steps,
                                         self.steps_per_epoch)

    def train_step(self, inputs: list, targets: list, skipped: int = 0) -> DetStepLog:
        """One optimisation step on this rank's images (``[]``: all unreadable)."""
        cfg, model = self.cfg, self.model
        self.opt.zero_grad(set_to_none=True)
        # SyncBN all-reduces inside the forward: only when every rank has images this step
        model.backbone.sync_bn = cfg.sync_bn and all_ranks(bool(inputs), self.dist, cfg.device)
        if not inputs:
            skipped = optimizer_step(self, None, skipped, cfg.clip_grad)
            return DetStepLog(self.epoch, self.global_step, {}, [], self.opt.param_groups[0]["lr"], skipped)
        dev = torch.device(cfg.device)
        inputs = [x.to(dev) for x in inputs]
        targets = [{k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        with autocast(cfg.amp, cfg.device):
            losses, usage = model(inputs, targets, ratio_loss=cfg.ratio_loss, ratio_weight=cfg.ratio_weight)
        skipped = optimizer_step(self, losses["loss"], skipped, cfg.clip_grad)
        keep = usage.gate_keep_fraction().tolist() if usage.masks else []
        return DetStepLog(self.epoch, self.global_step, {k: float(v.detach()) for k, v in losses.items()}, keep,
                          self.opt.param_groups[0]["lr"], skipped)
