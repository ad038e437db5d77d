"""The epoch loop and optimisation step of every trainer (classifier and detector)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..distributed import barrier, broadcast_state
from ..seeding import epoch_seed, step_seed
from .parallel import average_gradients, shard


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled full batches of epoch ``epoch`` (the masked execution needs equal-sized batches)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch))).tolist()
    return [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


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
    """The epoch loop of every trainer: the data order of epoch ``e`` depends only on (seed, e), a
    resumed run continues mid-epoch at ``trainer.step_in_epoch``, unreadable images are counted in
    ``trainer.skipped``, checkpoints are saved every ``checkpoint_every`` steps and at the end of each
    epoch (by rank 0). ``step(*batch, skipped)`` runs one optimisation step and returns its log entry
    (``skipped``: over all ranks). Under torchrun each rank loads its shard of every batch
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
                            generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, trainer.epoch)))
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
