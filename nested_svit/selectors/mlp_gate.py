"""SViT's selection module (paper Eq. 1): LayerNorm -> Linear(C, C/4) -> GELU -> Linear(C/4, 2).

Logit 0 is "keep", logit 1 is "prune", as in the official release (``gumbel_softmax(...)[..., 0]``
in training, ``argmin(log_softmax)`` at inference, i.e. keep iff p(keep) > 0.5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import Mlp
from .base import TokenSelector


class MlpGate(TokenSelector):
    def __init__(self, dim: int, eps: float = 1e-5, tau: float = 1.0):
        super().__init__()
        self.tau = tau
        self.norm = nn.LayerNorm(dim, eps=eps)  # official SelectiveModule uses nn.LayerNorm's default eps
        self.mlp = Mlp(dim, dim // 4, 2)

    def logits(self, values: Tensor) -> Tensor:
        """``[T, C]`` -> ``[T, 2]`` (keep, prune)."""
        return self.mlp(self.norm(values))

    def margin(self, values: Tensor) -> Tensor:
        logits = self.logits(values)
        return logits[:, 0] - logits[:, 1]

    def sample(self, values: Tensor) -> Tensor:
        log_p = F.log_softmax(self.logits(values), dim=-1)
        return F.gumbel_softmax(log_p, tau=self.tau, hard=True)[:, 0]

    @torch.no_grad()
    def shift_margin(self, shift: float) -> None:
        self.mlp.fc2.bias[0] += shift / 2
        self.mlp.fc2.bias[1] -= shift / 2
