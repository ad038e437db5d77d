"""Every seeded random draw of the trainers and augmentations, so a run depends only on its seed and
position: never on worker layout, batch order, world size or where it was resumed."""
from __future__ import annotations

import torch


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of data item ``index``'s augmentation in ``epoch``."""
    return torch.Generator().manual_seed(item_seed(seed, epoch, index))


def item_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s data order (and of its loader's generator)."""
    return seed * 7919 + epoch


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of optimisation step ``step`` on ``rank`` (Gumbel noise, drop path)."""
    return ((seed * 1_000_003 + step) * 10_007 + rank) % (2 ** 63)
