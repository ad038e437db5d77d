"""Detector training (the paper's detection recipe, mmdet-style): AdamW, linear warm-up, step or cosine
decay, a separate gate learning rate, gradient clipping, bf16 autocast on CUDA; SViT gates in masked
execution with the keep-ratio loss. Checkpoints resume exactly (model, optimizer, scheduler, RNG, epoch,
step; data order and flips depend only on (seed, epoch, index)) and load as detector weights directly
(``load_checkpoint``, ``eval coco``, ``predict``): the model config travels in the file."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..parallel import all_ranks, broadcast_state, current
from ..train import TrainingCheckpoints, _rng_state, epoch_batches, fit_epochs, optimizer_step
from .detector import MaskRCNNDetector
from .training import detector_losses


@dataclass
class DetTrainConfig:
    epochs: int = 12
    batch_size: int = 2
    lr: float = 1e-4  # dense ViT-Adapter: 1e-4; SViT fine-tune: 1e-5
    gate_lr: float | None = None  # None: lr
    weight_decay: float = 0.05
    warmup_steps: int = 500  # linear from warmup_ratio * lr (mmdet: 500 iters, ratio 0.001)
    warmup_ratio: float = 0.001
    schedule: str = "step"  # "step": x0.1 at each of ``steps`` (epochs); "cosine"
    steps: tuple[int, ...] = (8, 11)
    clip_grad: float | None = None  # max gradient norm
    ratio_weight: float = 4.0
    ratio_loss: str = "dynamic"
    amp: bool = False
    seed: int = 0
    workers: int = 0
    checkpoint_every: int = 0  # steps; 0: end of each epoch
    drop_path: float = 0.0  # stochastic depth (official: 0.1 tiny, 0.2 small); training only
    sync_bn: bool = True  # under torchrun: the adapter's BatchNorm statistics over all ranks (mmdet's SyncBN)
    device: str = "cpu"


@dataclass
class DetStepLog:
    epoch: int
    step: int
    losses: dict
    keep: list
    lr: float
    skipped: int = 0


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim <= 1 or name.endswith(("pos_embed", "level_embed"))


class DetectorTrainer(TrainingCheckpoints):
    def __init__(self, model: MaskRCNNDetector, data, cfg: DetTrainConfig, checkpoint_path: str | Path | None = None):
        if cfg.schedule not in ("step", "cosine"):
            raise ValueError(f"schedule must be 'step' or 'cosine', not {cfg.schedule!r}")
        model.backbone.training_execution()  # a method that cannot train says so before any work
        self.model, self.data, self.cfg = model.to(cfg.device), data, cfg
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.steps_per_epoch = len(epoch_batches(len(data), cfg.batch_size, cfg.seed, 0))
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(data)} training images are fewer than one batch of {cfg.batch_size}")
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                groups.setdefault((name.startswith("backbone.gates."), _no_decay(name, p)), []).append(p)
        self.opt = torch.optim.AdamW([{"params": ps, "lr": (cfg.gate_lr or cfg.lr) if gate else cfg.lr,
                                       "weight_decay": 0.0 if no_decay else cfg.weight_decay}
                                      for (gate, no_decay), ps in sorted(groups.items())])
        total = cfg.epochs * self.steps_per_epoch
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: self._factor(step, total))
        self.epoch = self.step_in_epoch = self.global_step = self.skipped = 0
        self.dist = current()
        broadcast_state(model, self.dist)
        model.backbone.set_drop_path(cfg.drop_path)

    def _factor(self, step: int, total: int) -> float:
        cfg = self.cfg
        if cfg.schedule == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))
        else:
            decay = 0.1 ** sum(step >= s * self.steps_per_epoch for s in cfg.steps)
        if step < cfg.warmup_steps:
            decay *= cfg.warmup_ratio + (1 - cfg.warmup_ratio) * step / cfg.warmup_steps
        return decay

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        m = self.model
        return {"format": "nested_svit", "kind": "detector", "model_name": m.name, "model_config": m.config.to_dict(),
                "block_norm_eps": float(m.backbone.blocks[0].norm1.eps), "model": m.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "rng": _rng_state(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "skipped": self.skipped, "train_config": asdict(self.cfg)}

    # ------------------------------------------------------------------ loop
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
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and dev.type == "cuda")
        with autocast:
            losses, usage = detector_losses(model, inputs, targets, cfg.ratio_loss, cfg.ratio_weight)
        skipped = optimizer_step(self, losses["loss"], skipped, cfg.clip_grad)
        keep = usage.gate_keep_fraction().tolist() if usage.masks else []
        return DetStepLog(self.epoch, self.global_step, {k: float(v.detach()) for k, v in losses.items()}, keep,
                          self.opt.param_groups[0]["lr"], skipped)

    def fit(self, max_steps: int | None = None, log: Callable[[DetStepLog], None] | None = None) -> list[DetStepLog]:
        from ..data.coco import collate_train

        cfg, model = self.cfg, self.model
        model.train().set_execution(model.backbone.training_execution())
        logs = fit_epochs(self, collate_train, self.train_step, max_steps, log)
        if self.epoch < cfg.epochs:  # stopped by max_steps: still training
            return logs
        model.eval().set_execution("packed")
        return logs
