"""What every trainer does around its own step (``Trainer``: classifiers, ``DetectorTrainer``:
detectors): the method's training execution checked before any work, the model on the device, the
optimizer with the selectors' own learning rate, the schedule, the counters a checkpoint resumes, the
processes of a torchrun, stochastic depth, the data record and the JSONL log; ``fit`` runs the one epoch
loop (``loop.fit_epochs``) with the trainer's ``collate`` and ``train_step``."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..checkpoint.writer import model_payload
from ..distributed import broadcast_state, current
from .checkpoints import TrainingCheckpoints
from .config import TrainingConfig
from .log import StepLogFile
from .loop import epoch_batches, fit_epochs
from .optim import adamw


class TrainerBase(TrainingCheckpoints):
    """``model`` trained on ``data`` with ``cfg``. ``checkpoint_path``: saved there (every
    ``cfg.checkpoint_every`` steps and each epoch's end) with ``data_record`` (``{"path", "digest",
    "images"}``: a resume on other data is said), its log ``<stem>.log.jsonl`` a line every ``log_every``
    steps. A subclass names its ``stack`` (the token stack that prunes), its selector parameters'
    ``selector_prefix``, the parameters without weight decay (``no_decay``), its ``lr_factor`` (step ->
    factor), ``collate`` and ``train_step``."""

    selector_prefix = "gates."
    no_decay: tuple[str, ...] = ("pos_embed",)
    collate: Callable

    def __init__(self, model: nn.Module, data, cfg: TrainingConfig, checkpoint_path: str | Path | None = None,
                 data_record: dict | None = None, log_every: int = 10):
        self.stack_of(model).training_execution()  # a method that cannot train says so before any work
        self.model, self.data, self.cfg = model.to(cfg.device), data, cfg
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.data_record = data_record
        self.steps_per_epoch = len(epoch_batches(len(data), cfg.batch_size, cfg.seed, 0))
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(data)} training images are fewer than one batch of {cfg.batch_size}")
        self.opt = adamw(model, cfg.lr, cfg.selector_lr, cfg.weight_decay, self.selector_prefix, self.no_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.lr_factor(cfg.epochs * self.steps_per_epoch))
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.skipped = 0  # undecodable images met so far (counted again when an epoch repeats them)
        self.dist = current()
        broadcast_state(model, self.dist)
        self.stack_of(model).set_drop_path(cfg.drop_path)
        self.log_file = StepLogFile.beside(self.checkpoint_path, log_every, self.dist.is_main)

    @staticmethod
    def stack_of(model: nn.Module) -> nn.Module:
        """The token stack of ``model`` that prunes: a classifier is its own (a detector's trainer says its backbone)."""
        return model

    def lr_factor(self, total_steps: int) -> Callable[[int], float]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return model_payload(self.model, train_config=asdict(self.cfg), **self.training_state())

    def fit(self, max_steps: int | None = None, log: Callable | None = None) -> list:
        """Train until ``cfg.epochs`` (or ``max_steps`` more steps) -> the step logs; ``log(entry)`` after
        every step (a progress bar), besides the log file."""
        self.log_file.start(self.global_step)

        def logged(entry) -> None:
            self.log_file.write(entry)
            if log is not None:
                log(entry)

        self.model.train().set_execution(self.stack_of(self.model).training_execution())
        logs = fit_epochs(self, self.collate, self.train_step, max_steps, logged)
        if self.epoch >= self.cfg.epochs:  # done (not stopped by max_steps): ready for inference
            self.model.eval().set_execution("packed")
        return logs
