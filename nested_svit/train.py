"""Gate fine-tuning (paper Sec. 3.3): masked execution with straight-through Gumbel-softmax masks,
loss = task + lambda * keep-ratio loss, AdamW with a cosine schedule, separate learning rates for the
backbone and the gates. Checkpoints resume exactly: model, optimizer, scheduler, RNG, epoch and step,
with a data order and augmentation that depend only on (seed, epoch, index).
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .io import atomic_write
from .losses import keep_ratio_loss
from .model import SparseViT
from .parallel import average_gradients, barrier, broadcast_state, current, shard, step_seed


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-5  # backbone (paper: batchsize/512 * 1e-5)
    gate_lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 0
    ratio_weight: float = 4.0  # lambda
    ratio_loss: str = "dynamic"  # or "fixed"
    freeze_backbone: bool = False
    label_smoothing: float = 0.0
    amp: bool = False  # CUDA autocast (bf16)
    seed: int = 0
    workers: int = 0
    checkpoint_every: int = 0  # steps; 0: at the end of each epoch only
    drop_path: float = 0.0  # stochastic depth rate (linear over the blocks)
    device: str = "cpu"


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


def _is_gate(name: str) -> bool:
    return name.startswith("gates.")


def make_optimizer(model: SparseViT, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups: dict[tuple[bool, bool], list[Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name in ("pos_embed", "cls_token")
        groups.setdefault((_is_gate(name), no_decay), []).append(p)
    param_groups = [{"params": ps, "lr": cfg.gate_lr if gate else cfg.lr,
                     "weight_decay": 0.0 if no_decay else cfg.weight_decay}
                    for (gate, no_decay), ps in sorted(groups.items())]
    return torch.optim.AdamW(param_groups)


def make_scheduler(opt: torch.optim.Optimizer, total_steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


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
                torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
                image = self.transform(image)
        return image, label


def collate_skipping_bad(items: list) -> tuple[Tensor | None, Tensor | None, int]:
    """``(image, label)`` items, ``image`` None for an undecodable file -> (images, labels, skipped)."""
    ok = [(img, lab) for img, lab in items if img is not None]
    if not ok:
        return None, None, len(items)
    return torch.stack([img for img, _ in ok]), torch.tensor([lab for _, lab in ok]), len(items) - len(ok)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled full batches of epoch ``epoch`` (the masked execution needs equal-sized batches)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    return [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def _rng_state() -> dict:
    """RNG states as tensors and plain lists, so the checkpoint loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingCheckpoints:
    """``save`` / ``resume`` of a trainer's full state (``state_dict``: model, optimizer, scheduler, RNG,
    position), shared by the classifier and detector trainers. Files load with ``weights_only=True``."""

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path or self.checkpoint_path)
        state = self.state_dict()
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        return path

    def resume(self, path: str | Path) -> None:
        try:
            state = torch.load(path, map_location=self.cfg.device, weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot resume from {path} (not a training checkpoint of this nested_svit version: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); pass --restart") from e
        if not isinstance(state, dict) or "optimizer" not in state:
            raise ValueError(f"{path} is not a training checkpoint (no optimizer state); use --init to start from "
                             "its weights, or another --out")
        if state.get("model_name") not in (None, self.model.name):
            raise ValueError(f"{path} is a training checkpoint of model {state['model_name']!r}, not {self.model.name!r}; "
                             "use another --out or pass --restart")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.skipped = state.get("skipped", 0)
        _set_rng_state(state["rng"])


class Trainer(TrainingCheckpoints):
    """Fine-tunes ``model`` on ``data`` (a data set of ``(image [3,H,W], label)``)."""

    def __init__(self, model: SparseViT, data: Dataset, cfg: TrainConfig,
                 augment: Callable[[Tensor], Tensor] | None = None, checkpoint_path: str | Path | None = None):
        model.training_execution()  # a method that cannot train says so before any work
        self.model, self.cfg = model.to(cfg.device), cfg
        self.data = SeededAugment(data, augment, cfg.seed)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        for name, p in model.named_parameters():
            p.requires_grad_(_is_gate(name) or not cfg.freeze_backbone)
        self.steps_per_epoch = len(epoch_batches(len(self.data), cfg.batch_size, cfg.seed, 0))
        if self.steps_per_epoch == 0:
            raise ValueError(f"data set of {len(self.data)} images is smaller than one batch of {cfg.batch_size}")
        self.opt = make_optimizer(model, cfg)
        self.sched = make_scheduler(self.opt, cfg.epochs * self.steps_per_epoch, cfg.warmup_steps)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.skipped = 0  # undecodable images met so far (counted again when an epoch repeats them)
        self.dist = current()
        broadcast_state(model, self.dist)
        model.set_drop_path(cfg.drop_path)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "rng": _rng_state(), "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "global_step": self.global_step, "skipped": self.skipped,
                "train_config": asdict(self.cfg), "model_name": self.model.name,
                "model_config": asdict(self.model.config), "class_names": getattr(self.model, "class_names", None)}

    # ------------------------------------------------------------------ loop
    def train_step(self, images: Tensor | None, labels: Tensor | None, skipped: int = 0) -> StepLog:
        """One optimisation step on this rank's ``images [B, 3, H, W]`` (None: all unreadable)."""
        cfg, model = self.cfg, self.model
        self.opt.zero_grad(set_to_none=True)
        if images is None:
            skipped = optimizer_step(self, None, skipped)
            nan = float("nan")
            return StepLog(self.epoch, self.global_step, nan, nan, nan, [], self.opt.param_groups[0]["lr"], skipped)
        images, labels = images.to(cfg.device), labels.to(cfg.device)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and cfg.device.startswith("cuda") else _null()
        with amp:
            feats, usage = model.forward_features(images)
            logits = model.forward_head(feats)
            task = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            ratio = keep_ratio_loss(usage, model.config.keep_targets, cfg.ratio_loss) if model.config.method == "svit" \
                and model.num_gates else \
                torch.zeros((), device=logits.device)
            loss = task + cfg.ratio_weight * ratio
        skipped = optimizer_step(self, loss, skipped)
        keep = usage.gate_keep_fraction().tolist() if usage.masks else []
        return StepLog(self.epoch, self.global_step, loss.item(), task.item(), ratio.item(), keep,
                       self.opt.param_groups[0]["lr"], skipped)

    def fit(self, max_steps: int | None = None, log: Callable[[StepLog], None] | None = None) -> list[StepLog]:
        """Train until ``cfg.epochs`` (or ``max_steps`` more steps); returns the step logs."""
        self.model.train().set_execution(self.model.training_execution())
        return fit_epochs(self, collate_skipping_bad, self.train_step, max_steps, log)


def optimizer_step(trainer, loss: Tensor | None, skipped: int, clip_grad: float | None = None) -> int:
    """Backward ``loss`` (None: this rank had no readable image), average the gradients over the ranks
    (``parallel.average_gradients``), clip, step optimizer and schedule; no step when no rank had data.
    -> images skipped in this step over all ranks."""
    if loss is not None:
        loss.backward()
    params = [p for group in trainer.opt.param_groups for p in group["params"]]
    ranks_with_data, (skipped_all,) = average_gradients(params, trainer.dist, loss is not None, (float(skipped),))
    if ranks_with_data:
        if clip_grad:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip_grad)
        trainer.opt.step()
        trainer.sched.step()
    return int(skipped_all)


def fit_epochs(trainer, collate: Callable, step: Callable, max_steps: int | None, log: Callable | None) -> list:
    """The epoch loop of every trainer (classifier and detector): the data order of epoch ``e`` depends
    only on (seed, e), a resumed run continues mid-epoch at ``trainer.step_in_epoch``, unreadable images
    are counted in ``trainer.skipped``, checkpoints are saved every ``checkpoint_every`` steps and at the
    end of each epoch (by rank 0). ``step(*batch, skipped)`` runs one optimisation step and returns its
    log entry (``skipped``: over all ranks). Under torchrun each rank loads its shard of every batch
    (``parallel.shard``); each step's random draws are seeded by (seed, step, rank).
    Stops after ``max_steps`` steps of this call when given."""
    cfg, info = trainer.cfg, trainer.dist
    if cfg.batch_size % info.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the {info.world_size} processes")
    logs: list = []
    done = 0
    while trainer.epoch < cfg.epochs:
        trainer.data.epoch = trainer.epoch
        batches = [shard(b, info) for b in
                   epoch_batches(len(trainer.data), cfg.batch_size, cfg.seed, trainer.epoch)[trainer.step_in_epoch:]]
        # the loader's own generator: creating an iterator must not draw from the global RNG,
        # or a resumed run (one extra loader) would see different Gumbel noise
        loader = DataLoader(trainer.data, batch_sampler=batches, num_workers=cfg.workers, collate_fn=collate,
                            generator=torch.Generator().manual_seed(cfg.seed * 7919 + trainer.epoch))
        for *batch, skipped in loader:
            torch.manual_seed(step_seed(cfg.seed, trainer.global_step, info.rank))
            broadcast_state(trainer.model, info, parameters=False)
            entry = step(*batch, skipped)
            trainer.skipped += entry.skipped
            trainer.step_in_epoch += 1
            trainer.global_step += 1
            done += 1
            logs.append(entry)
            if log:
                log(entry)
            if trainer.checkpoint_path and cfg.checkpoint_every and trainer.global_step % cfg.checkpoint_every == 0 \
                    and info.is_main:
                trainer.save()
            if max_steps is not None and done >= max_steps:
                return logs
        trainer.epoch += 1
        trainer.step_in_epoch = 0
        if trainer.checkpoint_path and info.is_main:
            trainer.save()
    barrier(info)  # the last checkpoint is written before any rank moves on
    return logs


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
