"""Test helpers: exact keep masks injected through the selector protocol, and error measures."""
from __future__ import annotations

import torch
from torch import Tensor

from nested_svit.methods.svit import TokenSelector


class FixedMaskSelector(TokenSelector):
    """Keeps exactly the rows of a given ``[T]`` bool mask (for tests of the executions)."""

    def __init__(self, keep: Tensor):
        super().__init__()
        self.register_buffer("keep", keep.bool())

    def margin(self, values: Tensor) -> Tensor:
        assert values.shape[0] == self.keep.shape[0]
        return torch.where(self.keep, 1.0, -1.0).to(values.dtype)

    def sample(self, values: Tensor) -> Tensor:
        return self.keep.to(values.dtype)


def install_masks(model, masks: list[Tensor]) -> None:
    for k, keep in enumerate(masks):
        model.gates[k] = FixedMaskSelector(keep)


def random_masks(gen: torch.Generator, lengths: list[int], fractions: list[list[float]]) -> list[Tensor]:
    """One ``[T]`` mask per gate; image ``b`` keeps about ``fractions[gate][b]`` of its tokens."""
    masks = []
    for per_image in fractions:
        parts = [torch.rand(n, generator=gen) < f for n, f in zip(lengths, per_image)]
        masks.append(torch.cat(parts))
    return masks


def rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
