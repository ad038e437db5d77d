"""The protocol every selector (SViT gate, and the baselines to come) implements."""
from __future__ import annotations

from torch import Tensor, nn


class TokenSelector(nn.Module):
    """Scores every token of the (packed) feature map; the model turns scores into a keep mask.

    ``margin(values [T, C]) -> [T]``: keep iff ``margin > 0`` at inference.
    ``sample(values [T, C]) -> [T]``: float {0, 1} mask for training, differentiable
    (straight-through) in the selector's parameters.
    ``shift_margin(s)``: move the decision threshold (calibration) by editing parameters, so a
    saved checkpoint carries the calibration.
    """

    def margin(self, values: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, values: Tensor) -> Tensor:
        raise NotImplementedError

    def shift_margin(self, shift: float) -> None:
        raise NotImplementedError
