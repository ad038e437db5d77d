"""Keep-ratio losses of the paper, over the tokens each gate decides on.

dynamic (Eq. 2): ``mean_l ( (1/BN) sum_b sum_n M^{b,l}_n - t^l )^2`` -- the keep fraction is averaged
over the whole batch, so images may keep different numbers of tokens (dynamic rate).
fixed (Eq. 3): ``mean_l mean_b ( (1/N) sum_n M^{b,l}_n - t^l )^2`` -- every image is pushed to the target.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .model import TokenUsage

RATIO_LOSSES = ("dynamic", "fixed")


def keep_ratio_loss(usage: TokenUsage, targets: Sequence[float], kind: str = "dynamic") -> Tensor:
    """Scalar loss from the per-gate masks recorded in ``usage`` (``masked`` execution)."""
    if kind not in RATIO_LOSSES:
        raise ValueError(f"ratio loss {kind!r}; choose from {RATIO_LOSSES}")
    if not usage.masks:
        raise ValueError("no gate masks recorded: the model has no gates")
    lengths = usage.total.tolist()  # rows per image (images may differ: mixed resolutions)
    terms = []
    for mask, decided, target in zip(usage.masks, usage.decided, targets):
        m, d = mask.float(), decided.float()
        if kind == "dynamic":
            terms.append(((m * d).sum() / d.sum() - target) ** 2)
        else:
            per_image = [(mi * di).sum() / di.sum() for mi, di in zip(m.split(lengths), d.split(lengths))]
            terms.append(((torch.stack(per_image) - target) ** 2).mean())
    return torch.stack(terms).mean()
