"""SViT (the paper): an MLP gate before each gated block decides, per token, whether the block processes
it; pruned tokens keep their value and any later gate may pick them again (reactivation).

Training samples straight-through Gumbel masks in the masked execution, with the keep-ratio loss
(Eq. 2 ``dynamic``: the keep fraction averaged over the whole batch, so images keep different numbers
of tokens; Eq. 3 ``fixed``: every image pushed to the target). ``calibrate_gates`` shifts each gate's
threshold to hit a keep fraction without retraining. Without pruning blocks this is dense DeiT.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ViTConfig
from ..layers import Mlp
from ..tokens import Packed
from .base import Method, MethodRun


@dataclass(frozen=True)
class SViTOptions:
    prune_cls_last: bool = True  # the last gate may prune the class token (official release)
    reactivation: bool = True  # False: keep_l <- keep_l & keep_{l-1} (paper's ablation)
    gate_norm_eps: float = 1e-5  # official SelectiveModule: nn.LayerNorm's default eps
    gate_tau: float = 1.0  # Gumbel-softmax temperature in training


class TokenSelector(nn.Module):
    """A gate: scores every token of the (packed) feature map; the run turns scores into a keep mask.

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


class MlpGate(TokenSelector):
    """SViT's selection module (paper Eq. 1): LayerNorm -> Linear(C, C/4) -> GELU -> Linear(C/4, 2).
    Logit 0 is "keep", logit 1 "prune", as in the official release (``gumbel_softmax(...)[..., 0]`` in
    training, ``argmin(log_softmax)`` at inference, i.e. keep iff p(keep) > 0.5)."""

    def __init__(self, dim: int, eps: float = 1e-5, tau: float = 1.0):
        super().__init__()
        self.tau = tau
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, dim // 4, 2)

    def logits(self, values: Tensor) -> Tensor:
        """``[T, C]`` -> ``[T, 2]`` (keep, prune), in the gate's own precision (fp32 under ``set_precision``:
        the feature map may be bf16, the margin is never computed in it)."""
        return self.mlp(self.norm(values.to(self.norm.weight.dtype)))

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


def make_gates(config: ViTConfig, options: SViTOptions) -> list[nn.Module]:
    return [MlpGate(config.embed_dim, options.gate_norm_eps, options.gate_tau) for _ in config.gate_blocks]


class SViTRun(MethodRun):
    """Gate ``k`` before block ``gate_blocks[k]``; the class token is protected except by the last
    gate when ``prune_cls_last``; ``reactivation=False`` multiplies each mask by the previous one.
    ``calibrate``: per gate a keep target; each gate's threshold is shifted to it as the pass runs."""

    def __init__(self, block_pass, calibrate: Sequence[float] | None = None) -> None:
        super().__init__(block_pass)
        stack = block_pass.stack
        self.stack = stack
        self.options: SViTOptions = stack.options
        self.calibrate = calibrate
        self.gate_of_block = {b: k for k, b in enumerate(stack.config.gate_blocks)}
        self.prev: Tensor | None = None

    def before_block(self, i: int, x: Packed) -> Tensor | None:
        k = self.gate_of_block.get(i)
        if k is None:
            return None
        protect = self.block_pass.protect
        if k == len(self.gate_of_block) - 1 and self.options.prune_cls_last:
            protect = torch.zeros_like(protect)
        keep = self._gate_mask(k, x, protect)
        if not self.options.reactivation and self.prev is not None:
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
            shift = keep_threshold_shift(margin[~protect], self.calibrate[k])
            gate.shift_margin(shift)
            margin = margin + shift
        keep = (margin > 0) | protect
        return keep.to(x.values.dtype) if stack.execution == "masked" else keep

    def expected_rows(self, i: int) -> float | None:
        """The protected rows plus the gate's keep target (the calibrated one, when calibrated) of the rows
        it decides on."""
        k = self.gate_of_block.get(i)
        if k is None:
            return None
        stack = self.stack
        targets = stack.observed_keep or keep_targets_of(stack)
        total = self.block_pass.layout.total
        protected = 0 if (k == len(self.gate_of_block) - 1 and self.options.prune_cls_last) or \
            self.stack.cls_token is None else self.block_pass.layout.batch_size
        return protected + targets[k] * (total - protected)

    def readout_mask(self) -> Tensor | None:
        if self.prev is None:
            return None
        return self.prev if self.prev.dtype == torch.bool else self.prev > 0.5


def keep_targets_of(stack) -> tuple[float, ...]:
    """The gates' keep targets: those they were calibrated to, else the config's."""
    return tuple(stack.keep_targets_in_use or stack.config.keep_targets)


def observe_keep(stack, usage) -> None:
    """After a capacity forward: per gate, the largest batch-average fraction of its decided tokens kept so
    far in this process (``stack.observed_keep``), from the kept counts the forward read anyway, and never
    less than the gate's keep target: the capacity grows with what the gates keep on the run's data (a small
    first batch that keeps little cannot shrink it below the targets)."""
    gates, b = stack.config.gate_blocks, usage.total.numel()
    total = int(usage.total.sum())
    fractions = []
    for k, block in enumerate(gates):
        last = k == len(gates) - 1 and stack.options.prune_cls_last
        protected = 0 if last or stack.cls_token is None else b
        decided = total - protected
        fractions.append((int(usage.kept[:, block].sum()) - protected) / decided if decided > 0 else 0.0)
    seen = stack.observed_keep or keep_targets_of(stack)
    stack.observed_keep = tuple(max(a, c) for a, c in zip(seen, fractions))


# ---------------------------------------------------------------- keep targets and calibration
def validate_keep_targets(targets: object, num_gates: int) -> list[float]:
    """A sequence of ``num_gates`` numbers in [0, 1] -> list of floats; anything else is a ValueError."""
    if hasattr(targets, "tolist") and not isinstance(targets, Tensor):  # numpy arrays
        targets = targets.tolist()
    if isinstance(targets, (str, bytes, Tensor)) or not isinstance(targets, Sequence):
        raise ValueError(f"keep targets must be a list of {num_gates} numbers in [0, 1], got {type(targets).__name__}")
    out = []
    for t in targets:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or not 0.0 <= t <= 1.0:
            raise ValueError(f"keep targets must be numbers in [0, 1], got {t!r}")
        out.append(float(t))
    if len(out) != num_gates:
        raise ValueError(f"{len(out)} keep targets for {num_gates} gates")
    return out


def keep_budget(targets: Sequence[float] | None, scale: float | None, defaults: Sequence[float]) -> list[float]:
    """The keep targets of a calibration: ``targets`` (one per gate), or the model's ``defaults`` times
    ``scale`` (clipped to [0, 1]), or the defaults themselves."""
    if targets is not None:
        return validate_keep_targets(list(targets), len(defaults))
    if scale is not None:
        if not scale >= 0:
            raise ValueError(f"keep-target scale factor must be >= 0, got {scale}")
        return [min(1.0, float(t) * scale) for t in defaults]
    return [float(t) for t in defaults]


def keep_threshold_shift(margin: Tensor, target: float) -> float:
    """Shift ``s`` such that ``(margin + s > 0).mean()`` is as close as possible to ``target``."""
    n = margin.numel()
    if n == 0:
        return 0.0
    d = margin.float().sort(descending=True).values
    k = min(max(round(target * n), 0), n)
    if k == 0:
        return float(-d[0] - 1.0)
    if k == n:
        return float(-d[-1] + 1.0)
    return float(-(d[k - 1] + d[k]) / 2)


@torch.no_grad()
def calibrate_gates(stack, images, targets: Sequence[float] | None = None) -> list[float]:
    """Shift each gate's keep/prune logit bias so that, on ``images``, the batch-average keep fraction
    of gate ``l`` (over the tokens it decides on) equals ``targets[l]`` (default: the config's keep
    targets). Gates are calibrated in order, each on the feature map produced by the already
    calibrated earlier gates. Per-image counts still vary. -> the fractions reached."""
    targets = validate_keep_targets(stack.config.keep_targets if targets is None else targets, stack.num_gates)
    saved = (stack.execution, stack.gates_open, stack.capacity)
    stack.execution, stack.gates_open, stack.capacity = "packed", False, None  # shifts are read per gate
    try:
        usage = stack.forward_usage(images, run=lambda block_pass: SViTRun(block_pass, calibrate=targets))
    finally:
        stack.execution, stack.gates_open, stack.capacity = saved
    stack.keep_targets_in_use = tuple(targets)
    stack.observed_keep = None  # new thresholds: what the gates keep is to be seen again
    return usage.gate_keep_fraction().tolist()


# ---------------------------------------------------------------- training
RATIO_LOSSES = ("dynamic", "fixed")


def keep_ratio_loss(usage, targets: Sequence[float], kind: str = "dynamic") -> Tensor:
    """Scalar keep-ratio loss from the per-gate masks recorded in ``usage`` (``TokenUsage``, masked
    execution): dynamic (Eq. 2) ``mean_l ((1/BN) sum_b sum_n M^{b,l}_n - t^l)^2`` over the decided
    tokens of the whole batch; fixed (Eq. 3) ``mean_l mean_b ((1/N) sum_n M^{b,l}_n - t^l)^2``."""
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


def gate_flops(config: ViTConfig, options: SViTOptions, kept: Tensor, total: Tensor) -> Tensor:
    """Every gate scores all ``N`` tokens: ``2 N (C C/4 + C/4 2)`` each."""
    c = config.embed_dim
    return len(config.gate_blocks) * 2 * total.double() * (c * (c // 4) + (c // 4) * 2)


METHOD = Method(
    name="svit", title="SViT", run=SViTRun, options=SViTOptions, make_selectors=make_gates,
    needs_class_token=False, train_execution="masked", calibrate=calibrate_gates, ratio_loss=keep_ratio_loss,
    selector_flops=gate_flops, counts_on_device=True, capacity=True, observe=observe_keep,
)
