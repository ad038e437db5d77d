"""The token stack shared by every model: patch embedding, ViT blocks and the selectors before them.

``TokenStack`` owns the parameters that carry timm's names (``patch_embed``, ``pos_embed``,
``cls_token``, ``blocks.{i}``, ``gates.{k}``) and the executions. ``BlockPass`` is one forward through
the blocks; it can run them in stretches (``run(x, start, stop)``), so a model that interleaves other
layers with the blocks (the ViT-Adapter detector backbone) uses the very same select -> block -> write
back loop as the classifier.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from .attention import resolve_backend
from .config import ViTConfig
from .execution import EXECUTIONS, RUNNERS
from .layers import Block, PatchEmbed, resize_pos_embed
from .selectors import MlpGate, TokenSelector
from .tokens import Packed, keep_counts

Images = Tensor | Sequence[Tensor]


@dataclass
class TokenUsage:
    """What each block processed.

    kept: ``[B, depth]`` int64 tokens processed per image per block (class token included).
    total: ``[B]`` int64 tokens per image.
    masks / decided: per gate, the ``[T]`` keep mask (float, straight-through when training) and
    which rows the gate decided on (not protected); used by the keep-ratio losses.
    """

    kept: Tensor
    total: Tensor
    gate_blocks: tuple[int, ...]
    masks: list[Tensor] = field(default_factory=list, repr=False)
    decided: list[Tensor] = field(default_factory=list, repr=False)

    def keep_ratio(self) -> Tensor:
        """``[B, depth]`` kept / total."""
        return self.kept.float() / self.total.float().clamp_min(1).unsqueeze(1)

    def gate_keep_fraction(self) -> Tensor:
        """``[num_gates]``: batch-average fraction of decided tokens kept by each gate."""
        return torch.stack([(m.detach().float()[d]).mean() if d.any() else m.new_zeros(())
                            for m, d in zip(self.masks, self.decided)]) if self.masks else torch.zeros(0)

    def select(self, order: Sequence[int]) -> "TokenUsage":
        """The usage rows of images ``order`` (per-image fields only; masks are dropped)."""
        idx = torch.as_tensor(list(order), dtype=torch.int64)
        return TokenUsage(self.kept[idx], self.total[idx], self.gate_blocks)


class TokenStack(nn.Module):
    """Patch embedding + blocks + selectors of ``config``; subclasses add what reads the tokens."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.name = "custom"
        c = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c)) if config.class_token else None
        # without a class token the position table keeps its class row (unused), as DeiT/ViT-Adapter files do
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, c))
        self.blocks = nn.ModuleList(Block(c, config.num_heads, config.mlp_ratio, config.block_norm_eps)
                                    for _ in range(config.depth))
        self.gates = nn.ModuleList(MlpGate(c, config.gate_norm_eps, config.gate_tau) for _ in config.gate_blocks)
        self.execution = "packed"
        self.backend = "auto"
        self.gates_open = False  # True: every gate keeps every token (dense behaviour, gate cost still paid)
        self._gate_of_block = {b: k for k, b in enumerate(config.gate_blocks)}

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.dtype

    @property
    def num_gates(self) -> int:
        return len(self.gates)

    def set_drop_path(self, rate: float) -> "TokenStack":
        """Stochastic depth for training: block ``i`` drops its residual branches with probability
        ``rate * i / (depth - 1)`` (timm's linear rule); 0 turns it off."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        depth = len(self.blocks)
        for i, block in enumerate(self.blocks):
            block.drop_path = rate * i / max(depth - 1, 1)
        return self

    def set_execution(self, mode: str, backend: str | None = None) -> "TokenStack":
        """``packed`` (inference), ``masked`` (training, Eq. 1) or ``reference`` (per-image loop);
        ``backend``: variable-length attention backend for ``packed`` (``auto`` or one of
        ``attention.BACKENDS``)."""
        if mode not in EXECUTIONS:
            raise ValueError(f"unknown execution {mode!r}; choose from {EXECUTIONS}")
        self.execution = mode
        if backend is not None:
            resolve_backend(backend, self.pos_embed.device, self.dtype)  # validates
            self.backend = backend
        return self

    # ------------------------------------------------------------------ embedding
    def embed_batch(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, (1 +) H/p * W/p, C]`` (class token first when the model has one)."""
        grid = self.patch_embed.grid(images.shape[-2], images.shape[-1])
        x = self.patch_embed(images)
        pos = resize_pos_embed(self.pos_embed, grid)
        if self.cls_token is None:
            return x + pos[:, 1:]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        return x + pos

    def embed(self, images: Images) -> Packed:
        """Images -> packed feature map. A tensor is a uniform batch; a list may mix resolutions
        (images of one size are embedded together)."""
        if isinstance(images, Tensor):
            return Packed.from_dense(self.embed_batch(images))
        if len(images) == 0:
            raise ValueError("empty list of images")
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            if img.ndim != 3:
                raise ValueError(f"image {i}: expected [C, H, W], got shape {tuple(img.shape)}")
            by_size.setdefault(tuple(img.shape), []).append(i)
        seqs: list[Tensor] = [None] * len(images)  # type: ignore[list-item]
        for idx in by_size.values():
            for i, seq in zip(idx, self.embed_batch(torch.stack([images[i] for i in idx]))):
                seqs[i] = seq
        return Packed.from_list(seqs)

    def begin(self, x: Packed, calibrate: Sequence[float] | None = None) -> "BlockPass":
        """Start a forward through the blocks on feature map ``x`` (its layout fixes the images)."""
        return BlockPass(self, x, calibrate)

    # ------------------------------------------------------------------ calibration
    def forward_usage(self, images: Images, calibrate: Sequence[float] | None = None) -> TokenUsage:
        """Run far enough to know every gate's decisions; subclasses with other layers override."""
        x = self.embed(images)
        block_pass = self.begin(x, calibrate)
        block_pass.run(x, 0, self.config.depth)
        return block_pass.usage()

    @torch.no_grad()
    def calibrate_keep(self, images: Images, targets: Sequence[float] | None = None) -> list[float]:
        """Shift each gate's keep/prune logit bias so that, on ``images``, the batch-average keep
        fraction of gate ``l`` (over the tokens it decides on) equals ``targets[l]`` (default: the
        config's keep targets). Gates are calibrated in order, each on the feature map produced by
        the already calibrated earlier gates. Per-image counts still vary. Returns the fractions
        reached."""
        targets = validate_keep_targets(self.config.keep_targets if targets is None else targets, self.num_gates)
        saved = (self.execution, self.gates_open)
        self.execution, self.gates_open = "packed", False
        try:
            usage = self.forward_usage(images, calibrate=targets)
        finally:
            self.execution, self.gates_open = saved
        return usage.gate_keep_fraction().tolist()


class BlockPass:
    """One forward through ``stack``'s blocks: gates decide, the execution runs the block on the
    kept tokens, and usage is recorded. ``run`` may be called on consecutive stretches of blocks,
    with other layers changing the feature map in between (same layout)."""

    def __init__(self, stack: TokenStack, x: Packed, calibrate: Sequence[float] | None = None):
        self.stack = stack
        self.calibrate = calibrate
        self.runner = RUNNERS[stack.execution]
        self.backend = resolve_backend(stack.backend, x.values.device, x.values.dtype)
        self.layout = x.layout
        self.protect = torch.zeros(self.layout.total, dtype=torch.bool, device=x.values.device)
        if stack.cls_token is not None:
            self.protect[self.layout.first_rows] = True
        self.lengths = torch.tensor(self.layout.lengths, dtype=torch.int64)
        self.kept_cols: list[Tensor] = []
        self.masks: list[Tensor] = []
        self.decided: list[Tensor] = []
        self.prev: Tensor | None = None
        self.next_block = 0

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

    def run(self, x: Packed, start: int, stop: int) -> Packed:
        """Blocks ``start .. stop-1`` on ``x`` -> new feature map."""
        if start != self.next_block:
            raise ValueError(f"blocks must run in order: expected block {self.next_block}, got {start}")
        stack, cfg = self.stack, self.stack.config
        last_gate = stack.num_gates - 1
        for i in range(start, stop):
            k = stack._gate_of_block.get(i)
            keep = None
            if k is not None:
                protect = self.protect
                if k == last_gate and cfg.prune_cls_last:
                    protect = torch.zeros_like(protect)
                keep = self._gate_mask(k, x, protect)
                if not cfg.reactivation and self.prev is not None:
                    keep = keep * self.prev if keep.is_floating_point() else keep & self.prev
                self.prev = keep
                self.masks.append(keep)
                self.decided.append(~protect)
            counts = None if keep is None else keep_counts(keep, self.layout)
            self.kept_cols.append(self.lengths if counts is None else counts.cpu())
            x = self.runner(stack.blocks[i], x, keep, self.backend, counts)
        self.next_block = stop
        return x

    def usage(self) -> TokenUsage:
        kept = torch.stack(self.kept_cols, 1) if self.kept_cols else torch.zeros(len(self.lengths), 0, dtype=torch.int64)
        return TokenUsage(kept, self.lengths, self.stack.config.gate_blocks, self.masks, self.decided)


def validate_keep_targets(targets: object, num_gates: int) -> list[float]:
    """A sequence of ``num_gates`` numbers in [0, 1] -> list of floats; anything else is a ValueError."""
    import math

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


def keep_targets_from_cli(value: str, defaults: Sequence[float]) -> list[float]:
    """``--keep-targets``: one value per gate ("0.7,0.7,...") or one scale factor for the model's
    schedule ("0.8": every target times 0.8, clipped to [0, 1])."""
    try:
        values = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--keep-targets {value!r}: give numbers separated by commas") from None
    if len(values) == 1 and len(defaults) != 1:
        if not values[0] >= 0:
            raise ValueError(f"--keep-targets scale factor must be >= 0, got {value}")
        return [min(1.0, t * values[0]) for t in defaults]
    return validate_keep_targets(values, len(defaults))


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
