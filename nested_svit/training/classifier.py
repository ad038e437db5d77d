"""Classifier training (paper Sec. 3.3 for SViT): the method's training execution (SViT: masked, with
straight-through Gumbel-softmax masks), loss = task + lambda * the method's keep-ratio loss, AdamW with a
cosine schedule, separate learning rates for the backbone and the selectors. Checkpoints resume exactly:
model, optimizer, scheduler, RNG, epoch and step, with a data order and augmentation that depend only on
(seed, epoch, index)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..devices import autocast
from ..model import SparseViT
from ..seeding import item_seed
from .base import TrainerBase
from .config import TrainingConfig
from .loop import optimizer_step
from .optim import warmup_cosine


@dataclass
class TrainConfig(TrainingConfig):
    """Gate fine-tuning (paper: lr = batch size / 512 * 1e-5 for the backbone, 1e-3 for the gates)."""

    freeze_backbone: bool = False
    label_smoothing: float = 0.0


@dataclass
class StepLog:
    epoch: int
    step: int
    loss: float
    task_loss: float
    ratio_loss: float
    keep: list[float] = field(default_factory=list)
    lr: float = 0.0
    skipped: int = 0  # undecodable images left out of this step's batch


def _is_selector(name: str) -> bool:
    return name.startswith("gates.")


class SeededAugment(Dataset):
    """Wraps ``(image, label)`` data; ``transform`` runs under an RNG seeded by (seed, epoch, index), so
    an augmentation never depends on worker layout, batch order or where a run was resumed."""

    def __init__(self, base: Dataset, transform: Callable[[Tensor], Tensor] | None, seed: int):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        image, label = self.base[index]
        if image is not None and self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.seed, self.epoch, index))
                image = self.transform(image)
        return image, label


def collate_skipping_bad(items: list) -> tuple[Tensor | None, Tensor | None, int]:
    """``(image, label)`` items, ``image`` None for an undecodable file -> (images, labels, skipped)."""
    ok = [(img, lab) for img, lab in items if img is not None]
    if not ok:
        return None, None, len(items)
    return torch.stack([img for img, _ in ok]), torch.tensor([lab for _, lab in ok]), len(items) - len(ok)


class Trainer(TrainerBase):
    """Fine-tunes ``model`` on ``data`` (a data set of ``(image [3,H,W], label)``), each image through
    ``augment`` under a seed of its own (``SeededAugment``); ``freeze_backbone``: the selectors alone train."""

    no_decay = ("pos_embed", "cls_token")
    collate = staticmethod(collate_skipping_bad)

    def __init__(self, model: SparseViT, data: Dataset, cfg: TrainConfig,
                 augment: Callable[[Tensor], Tensor] | None = None, checkpoint_path: str | Path | None = None,
                 data_record: dict | None = None, log_every: int = 10):
        for name, p in model.named_parameters():
            p.requires_grad_(_is_selector(name) or not cfg.freeze_backbone)
        super().__init__(model, SeededAugment(data, augment, cfg.seed), cfg, checkpoint_path, data_record, log_every)

    def lr_factor(self, total_steps: int) -> Callable[[int], float]:
        warmup = self.cfg.warmup_steps
        return lambda step: warmup_cosine(step, total_steps, warmup)

    def train_step(self, images: Tensor | None, labels: Tensor | None, skipped: int = 0) -> StepLog:
        """One optimisation step on this rank's ``images [B, 3, H, W]`` (None: all unreadable)."""
        cfg, model = self.cfg, self.model
        self.opt.zero_grad(set_to_none=True)
        if images is None:
            skipped = optimizer_step(self, None, skipped)
            nan = float("nan")
            return StepLog(self.epoch, self.global_step, nan, nan, nan, [], self.opt.param_groups[0]["lr"], skipped)
        images, labels = images.to(cfg.device), labels.to(cfg.device)
        with autocast(cfg.amp, cfg.device):
            feats, usage = model.forward_features(images, return_usage=True)
            logits = model.forward_head(feats)
            task = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            ratio_loss = model.method.ratio_loss
            ratio = ratio_loss(usage, model.config.keep_targets, cfg.ratio_loss) \
                if ratio_loss is not None and model.num_gates else torch.zeros((), device=logits.device)
            loss = task + cfg.ratio_weight * ratio
        skipped = optimizer_step(self, loss, skipped)
        keep = usage.gate_keep_fraction().tolist() if usage.masks else []
        return StepLog(self.epoch, self.global_step, loss.item(), task.item(), ratio.item(), keep,
                       self.opt.param_groups[0]["lr"], skipped)
