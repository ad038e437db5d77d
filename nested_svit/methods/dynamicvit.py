"""DynamicViT (Rao et al. 2021; raoyongming/DynamicViT ``VisionTransformerDiffPruning``), inference.

Before each pruning block (``gate_blocks``, DeiT-S: 3, 6, 9) a predictor scores the image's active
patch tokens; the top ``int(N0 * keep_targets[s])`` of them stay (``N0``: the image's initial patch
count; targets rho, rho^2, rho^3), the class token always stays, the rest are dropped for good.
Predictor (``PredictorLG``): ``LayerNorm(eps 1e-5) -> Linear(C, C) -> GELU``, the second half of the
channels replaced by its mean over the image's active patch tokens, then ``Linear(C, C/2) -> GELU ->
Linear(C/2, C/4) -> GELU -> Linear(C/4, 2) -> LogSoftmax``; channel 0 is "keep". The release's
``score_predictor.{s}`` parameters load as ``gates.{s}`` with the same inner names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ViTConfig
from ..layers import Linear
from ..tokens import Packed
from .base import Method
from .selection import SubsetRun, host_keep_count, keep_count


@dataclass(frozen=True)
class DynamicViTOptions:
    gate_norm_eps: float = 1e-5  # the predictors' LayerNorm


class PredictorLG(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim, eps=eps), Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(Linear(dim, dim // 2), nn.GELU(), Linear(dim // 2, dim // 4), nn.GELU(),
                                      Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))

    def keep_log_prob(self, values: Tensor, image: Tensor, num_images: int) -> Tensor:
        """``values [R, C]`` active patch tokens of images ``image [R]`` -> ``[R]`` log p(keep), computed in
        the predictor's own precision (fp32 under ``set_precision``: the decision is never made in bf16)."""
        h = self.in_conv(values.to(self.in_conv[1].weight.dtype))
        half = h.shape[-1] // 2
        sums = h.new_zeros(num_images, half).index_add_(0, image, h[:, half:])
        counts = torch.zeros(num_images, device=h.device, dtype=h.dtype).index_add_(
            0, image, torch.ones_like(image, dtype=h.dtype)).clamp_min(1)
        mean = sums / counts[:, None]
        return self.out_conv(torch.cat([h[:, :half], mean[image]], -1))[:, 0]


def make_gates(config: ViTConfig, options: DynamicViTOptions) -> list[nn.Module]:
    return [PredictorLG(config.embed_dim, options.gate_norm_eps) for _ in config.gate_blocks]


class DynamicViTRun(SubsetRun):
    def before_block(self, i: int, x: Packed) -> Tensor | None:
        s = self.stage_of_block.get(i)
        if s is None:
            return super().before_block(i, x)
        bp = self.block_pass
        candidates = self.active & ~bp.protect
        known = None if self.active_lengths is None else sum(self.active_lengths) - self.cls * len(self.active_lengths)
        rows = self.candidate_rows(candidates, known)
        image = bp.layout.image_index[rows]
        scores = bp.stack.gates[s].keep_log_prob(x.values[rows], image, bp.layout.batch_size)
        k = keep_count(bp.patches, self.config.keep_targets[s], "floor")
        lengths = None
        if self.active_lengths is not None:  # fixed counts: known on the host
            k_host = host_keep_count(self.base_patches(), self.config.keep_targets[s], "floor")
            lengths = [min(k, n - self.cls) + self.cls for k, n in zip(k_host, self.active_lengths)]
        return self.chose(self.top_k(scores.float(), rows, image, k) | (self.active & bp.protect), candidates, lengths)


def predictor_flops(config: ViTConfig, options: DynamicViTOptions, kept: Tensor, total: Tensor) -> Tensor:
    """The predictor over the active patch tokens of each pruning block:
    ``2 n (C^2 + C C/2 + C/2 C/4 + C/4 2)``."""
    c = config.embed_dim
    per_token = 2 * (c * c + c * (c // 2) + (c // 2) * (c // 4) + (c // 4) * 2)
    return ((kept.double()[:, list(config.gate_blocks)] - 1) * per_token).sum(1)


METHOD = Method(
    name="dynamicvit", title="DynamicViT", run=DynamicViTRun, options=DynamicViTOptions, make_selectors=make_gates,
    needs_class_token=False, train_execution=None,
    train_refusal="training DynamicViT is not implemented (its predictors learn through Gumbel masks and its own "
                  "distillation losses); its released weights run for inference",
    selector_flops=predictor_flops,
)
