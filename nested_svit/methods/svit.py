"""SViT (the paper): an MLP gate before each gated block decides, per token, whether the block processes
it; pruned tokens keep their value and any later gate may pick them again (reactivation). Training
samples straight-through Gumbel masks (masked execution); ``calibrate`` shifts each gate's threshold
to hit a keep fraction."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..config import ViTConfig
from ..selectors import MlpGate, TokenSelector
from ..tokens import Packed
from .base import MethodRun


def make_gates(config: ViTConfig) -> list[nn.Module]:
    return [MlpGate(config.embed_dim, config.gate_norm_eps, config.gate_tau) for _ in config.gate_blocks]


class SViTRun(MethodRun):
    """Gate ``k`` before block ``gate_blocks[k]``; the class token is protected except by the last
    gate when ``prune_cls_last``; ``reactivation=False`` multiplies each mask by the previous one."""

    def __init__(self, block_pass) -> None:
        super().__init__(block_pass)
        stack = block_pass.stack
        self.stack = stack
        self.calibrate: Sequence[float] | None = block_pass.calibrate
        self.gate_of_block = {b: k for k, b in enumerate(stack.config.gate_blocks)}
        self.prev: Tensor | None = None
        self.masks: list[Tensor] = []
        self.decided: list[Tensor] = []

    def before_block(self, i: int, x: Packed) -> Tensor | None:
        k = self.gate_of_block.get(i)
        if k is None:
            return None
        cfg, bp = self.stack.config, self.block_pass
        protect = bp.protect
        if k == len(self.gate_of_block) - 1 and cfg.prune_cls_last:
            protect = torch.zeros_like(protect)
        keep = self._gate_mask(k, x, protect)
        if not cfg.reactivation and self.prev is not None:
            keep = keep * self.prev if keep.is_floating_point() else keep & self.prev
        self.prev = keep
        self.masks.append(keep)
        self.decided.append(~protect)
        return keep

    def _gate_mask(self, k: int, x: Packed, protect: Tensor) -> Tensor:
        """Keep mask of gate ``k`` over all rows of ``x``: bool, or float {0,1} when sampling."""
        stack = self.stack
        gate: TokenSelector = stack.gates[k]
        if stack.gates_open:
            return torch.ones_like(protect)
        if stack.execution == "masked" and stack.training:
            return torch.where(protect, torch.ones_like(x.values[:, 0]), gate.sample(x.values))
        margin = gate.margin(x.values)
        if self.calibrate is not None:
            from ..stack import keep_threshold_shift

            shift = keep_threshold_shift(margin[~protect], self.calibrate[k])
            gate.shift_margin(shift)
            margin = margin + shift
        keep = (margin > 0) | protect
        return keep.to(x.values.dtype) if stack.execution == "masked" else keep

    def readout_mask(self) -> Tensor | None:
        if self.prev is None:
            return None
        return self.prev if self.prev.dtype == torch.bool else self.prev > 0.5
