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
from .methods import RUNS, make_gates, virtual_slots
from .tokens import Packed, keep_counts

Images = Tensor | Sequence[Tensor]


@dataclass
class TokenUsage:
    """What each block processed.

    kept: ``[B, depth]`` int64 tokens processed per image per block (class token included; by the
    attention half when a method selects between attention and MLP, see ``kept_mlp``).
    total: ``[B]`` int64 tokens per image (virtual rows not counted).
    masks / decided: per gate, the ``[T]`` keep mask (float, straight-through when training) and
    which rows the gate decided on (not protected); used by the keep-ratio losses.
    """

    kept: Tensor
    total: Tensor
    gate_blocks: tuple[int, ...]
    masks: list[Tensor] = field(default_factory=list, repr=False)
    decided: list[Tensor] = field(default_factory=list, repr=False)
    kept_mlp: Tensor | None = None  # [B, depth] tokens each block's MLP processed, where a method selects
    # between attention and MLP (EViT, ATS); None: as ``kept``

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
        return TokenUsage(self.kept[idx], self.total[idx], self.gate_blocks,
                          kept_mlp=None if self.kept_mlp is None else self.kept_mlp[idx])


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
        self.gates = nn.ModuleList(make_gates(config))
        self.slots = virtual_slots(config)  # extra rows per image a method writes (EViT's fused tokens)
        self.execution = "packed"
        self.backend = "auto"
        self.gates_open = False  # True: every gate keeps every token (dense behaviour, gate cost still paid)

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.dtype

    @property
    def num_gates(self) -> int:
        return len(self.gates)

    @property
    def prunes(self) -> bool:
        """Whether any block runs on fewer than all tokens (a method with places to act)."""
        return bool(self.config.gate_blocks)

    def set_drop_path(self, rate: float) -> "TokenStack":
        """Stochastic depth for training: block ``i`` drops its residual branches with probability
        ``rate * i / (depth - 1)`` (timm's linear rule); 0 turns it off."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        depth = len(self.blocks)
        for i, block in enumerate(self.blocks):
            block.drop_path = rate * i / max(depth - 1, 1)
        return self

    def training_execution(self) -> str:
        """The execution training runs in: SViT's gates learn in the masked execution (straight-through
        Gumbel masks, Eq. 1); the parameter-free baselines (EViT, Evo-ViT, ATS, ToMe) train through their
        own hard selection in the packed execution, as their authors' code does (gradients flow through
        the kept, fused or merged tokens)."""
        method = self.config.method
        if method == "svit":
            return "masked"
        if method == "dynamicvit":
            raise ValueError("training DynamicViT is not implemented (its predictors learn through Gumbel masks and "
                             "its own distillation losses); its released weights run for inference")
        return "packed"

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
            x = x + pos[:, 1:]
        else:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + pos
        if self.slots:  # virtual rows at the end, inactive until a method writes them
            x = torch.cat([x, x.new_zeros(x.shape[0], self.slots, x.shape[-1])], 1)
        return x

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
        if self.config.method != "svit":
            raise ValueError(f"calibration shifts SViT gate thresholds; {self.config.method} keeps fixed or "
                             "sampled counts (set keep_targets in the config instead)")
        targets = validate_keep_targets(self.config.keep_targets if targets is None else targets, self.num_gates)
        saved = (self.execution, self.gates_open)
        self.execution, self.gates_open = "packed", False
        try:
            usage = self.forward_usage(images, calibrate=targets)
        finally:
            self.execution, self.gates_open = saved
        return usage.gate_keep_fraction().tolist()


class BlockPass:
    """One forward through ``stack``'s blocks: the pruning method (``methods/``) says which rows each
    block processes, the execution runs the block on them, and usage is recorded. ``run`` may be
    called on consecutive stretches of blocks, with other layers changing the feature map in
    between (same layout).

    Row bookkeeping the methods read: ``layout`` (the whole map), ``protect`` (class-token rows),
    ``slot_mask`` / ``slot_rows [B, S]`` (virtual rows, EViT's fused tokens), ``patches [B]`` (each
    image's patch-token count, the base of the baselines' keep counts)."""

    def __init__(self, stack: TokenStack, x: Packed, calibrate: Sequence[float] | None = None):
        self.stack = stack
        self.calibrate = calibrate
        self.runner = RUNNERS[stack.execution]
        self.backend = resolve_backend(stack.backend, x.values.device, x.values.dtype)
        self.layout = x.layout
        device = x.values.device
        self.protect = torch.zeros(self.layout.total, dtype=torch.bool, device=device)
        if stack.cls_token is not None:
            self.protect[self.layout.first_rows] = True
        ends = self.layout.offsets[1:]
        self.slot_rows = ends[:, None] - stack.slots + torch.arange(stack.slots, device=device)[None, :]
        self.slot_mask = torch.zeros_like(self.protect)
        self.slot_mask[self.slot_rows.reshape(-1)] = True
        lengths = torch.tensor(self.layout.lengths, dtype=torch.int64)
        self.lengths = lengths - stack.slots  # real tokens per image
        self.patches = (self.lengths - int(stack.cls_token is not None)).to(device)
        self.kept_cols: list[Tensor] = []
        self.mlp_cols: list[Tensor] = []
        self.method = RUNS[stack.config.method](self)
        self.next_block = 0

    def run(self, x: Packed, start: int, stop: int) -> Packed:
        """Blocks ``start .. stop-1`` on ``x`` -> new feature map."""
        if start != self.next_block:
            raise ValueError(f"blocks must run in order: expected block {self.next_block}, got {start}")
        for i in range(start, stop):
            keep = self.method.before_block(i, x)
            if keep is not None and self.stack.slots == 0 and self.stack.config.method != "svit" and bool(keep.all()):
                keep = None  # every row: the plain path
            counts = None if keep is None else keep_counts(keep, self.layout)
            self.kept_cols.append(self.lengths if counts is None else counts.cpu())
            x = self.runner(self.stack.blocks[i], x, keep, self.backend, counts, self.method, i)
            selects = self.method.has_mid_selection(i) or self.method.selects_queries(i)
            mlp_rows = getattr(self.method, "active", None) if selects else None
            self.mlp_cols.append(self.kept_cols[-1] if mlp_rows is None else keep_counts(mlp_rows, self.layout).cpu())
        self.next_block = stop
        return x

    def readout(self, x: Packed) -> Packed:
        """The map a head or neck reads: with ``remove_pruned`` the rows not active at the end are zero
        (the paper's "remove"); otherwise they keep their last value ("preserve"). The class token
        is read as it is either way (SViT's last gate may prune it). Virtual rows are dropped by the
        caller (``slot_mask``)."""
        mask = self.method.readout_mask()
        if not self.stack.config.remove_pruned or mask is None:
            return x
        return x.with_values(x.values * (mask | self.protect).to(x.values.dtype)[:, None])

    def usage(self) -> TokenUsage:
        empty = torch.zeros(len(self.lengths), 0, dtype=torch.int64)
        kept = torch.stack(self.kept_cols, 1) if self.kept_cols else empty
        kept_mlp = torch.stack(self.mlp_cols, 1) if self.mlp_cols else empty
        return TokenUsage(kept, self.lengths, self.stack.config.gate_blocks, getattr(self.method, "masks", []),
                          getattr(self.method, "decided", []), kept_mlp)


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
