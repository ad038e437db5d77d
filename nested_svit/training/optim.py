"""The optimizer and schedules of both trainers: AdamW over parameter groups (selectors at their own
learning rate; no weight decay on biases, norms and position tables), cosine or step decay with a
linear warm-up."""
from __future__ import annotations

import math

import torch
from torch import nn


def adamw(model: nn.Module, lr: float, selector_lr: float, weight_decay: float, selector_prefix: str,
          no_decay: tuple[str, ...]) -> torch.optim.AdamW:
    """AdamW with one group per (selector?, no decay?): selector parameters (names starting with
    ``selector_prefix``) at ``selector_lr``; 1-d parameters and names ending in ``no_decay`` without
    weight decay. Only parameters that require gradients."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (name.startswith(selector_prefix), p.ndim <= 1 or name.endswith(no_decay))
            groups.setdefault(key, []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr": selector_lr if selector else lr,
                               "weight_decay": 0.0 if decay_free else weight_decay}
                              for (selector, decay_free), ps in sorted(groups.items())])


def warmup_cosine(step: int, total_steps: int, warmup: int) -> float:
    """The classifier's factor: linear warm-up ``(step + 1) / warmup``, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def mmdet_factor(step: int, total_steps: int, warmup: int, warmup_ratio: float, schedule: str,
                 step_epochs: tuple[int, ...], steps_per_epoch: int) -> float:
    """The detector's factor (mmdet's ``lr_config``): ``step`` x0.1 at each of ``step_epochs`` or
    ``cosine`` over all steps, times a linear warm-up from ``warmup_ratio`` over ``warmup`` steps."""
    if schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))
    else:
        decay = 0.1 ** sum(step >= s * steps_per_epoch for s in step_epochs)
    if step < warmup:
        decay *= warmup_ratio + (1 - warmup_ratio) * step / warmup
    return decay
