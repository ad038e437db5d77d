"""SparseViT: patch embed -> blocks (each optionally preceded by a token selector) -> norm -> head.

Dense DeiT is the same model with no selectors. Follows timm's surface: ``forward_features``,
``forward_head``, ``blocks.{i}.attn.qkv``; gates live in ``gates.{k}``.
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
        return self.kept.float() / self.total.float().unsqueeze(1)

    def gate_keep_fraction(self) -> Tensor:
        """``[num_gates]``: batch-average fraction of decided tokens kept by each gate."""
        return torch.stack([(m.detach().float()[d]).mean() if d.any() else m.new_zeros(())
                            for m, d in zip(self.masks, self.decided)]) if self.masks else torch.zeros(0)


class SparseViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.name = "custom"
        c = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, c))
        self.blocks = nn.ModuleList(Block(c, config.num_heads, config.mlp_ratio, config.block_norm_eps)
                                    for _ in range(config.depth))
        self.gates = nn.ModuleList(MlpGate(c, config.gate_norm_eps, config.gate_tau) for _ in config.gate_blocks)
        self.norm = nn.LayerNorm(c, eps=config.norm_eps)
        self.head = nn.Linear(c, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self.execution = "packed"
        self.backend = "auto"
        self.gates_open = False  # True: every gate keeps every token (dense behaviour, gate cost still paid)
        self._gate_of_block = {b: k for k, b in enumerate(config.gate_blocks)}
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ configuration
    def set_execution(self, mode: str, backend: str | None = None) -> "SparseViT":
        """``packed`` (inference), ``masked`` (training, Eq. 1) or ``reference`` (per-image loop);
        ``backend``: variable-length attention backend for ``packed`` (``auto`` or one of
        ``attention.BACKENDS``)."""
        if mode not in EXECUTIONS:
            raise ValueError(f"unknown execution {mode!r}; choose from {EXECUTIONS}")
        self.execution = mode
        if backend is not None:
            resolve_backend(backend, self.cls_token.device, self.cls_token.dtype)  # validates
            self.backend = backend
        return self

    @property
    def num_gates(self) -> int:
        return len(self.gates)

    # ------------------------------------------------------------------ embedding
    def _pos_embed_for(self, grid: tuple[int, int]) -> Tensor:
        return resize_pos_embed(self.pos_embed, grid)

    def _embed_batch(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, 1 + H/p * W/p, C]``."""
        grid = self.patch_embed.grid(images.shape[-2], images.shape[-1])
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        return x + self._pos_embed_for(grid)

    def embed(self, images: Images) -> Packed:
        """Images -> packed feature map. A tensor is a uniform batch; a list may mix resolutions
        (images of one size are embedded together)."""
        if isinstance(images, Tensor):
            return Packed.from_dense(self._embed_batch(images))
        if len(images) == 0:
            raise ValueError("empty list of images")
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            if img.ndim != 3:
                raise ValueError(f"image {i}: expected [C, H, W], got shape {tuple(img.shape)}")
            by_size.setdefault(tuple(img.shape), []).append(i)
        seqs: list[Tensor] = [None] * len(images)  # type: ignore[list-item]
        for idx in by_size.values():
            for i, seq in zip(idx, self._embed_batch(torch.stack([images[i] for i in idx]))):
                seqs[i] = seq
        return Packed.from_list(seqs)

    # ------------------------------------------------------------------ gates
    def _gate_mask(self, k: int, x: Packed, protect: Tensor, decided: Tensor,
                   calibrate_to: float | None) -> Tensor:
        """Keep mask of gate ``k`` over all rows of ``x``: bool, or float {0,1} when sampling."""
        gate: TokenSelector = self.gates[k]
        if self.gates_open:
            return torch.ones_like(protect)
        if self.execution == "masked" and self.training:
            return torch.where(protect, torch.ones_like(x.values[:, 0]), gate.sample(x.values))
        margin = gate.margin(x.values)
        if calibrate_to is not None:
            shift = keep_threshold_shift(margin[decided], calibrate_to)
            gate.shift_margin(shift)
            margin = margin + shift
        keep = (margin > 0) | protect
        return keep.to(x.values.dtype) if self.execution == "masked" else keep

    # ------------------------------------------------------------------ forward
    def forward_tokens(self, x: Packed, calibrate: Sequence[float] | None = None) -> tuple[Packed, TokenUsage]:
        """Run every block on the packed feature map; returns the map (before ``norm``) and usage."""
        runner = RUNNERS[self.execution]
        backend = resolve_backend(self.backend, x.values.device, x.values.dtype)
        layout = x.layout
        is_cls = torch.zeros(layout.total, dtype=torch.bool, device=x.values.device)
        is_cls[layout.first_rows] = True
        lengths = torch.tensor(layout.lengths, dtype=torch.int64)
        kept_cols, masks, decided_rows = [], [], []
        prev = None
        last_gate = self.num_gates - 1
        for i, block in enumerate(self.blocks):
            k = self._gate_of_block.get(i)
            keep = None
            if k is not None:
                protect = is_cls if not (k == last_gate and self.config.prune_cls_last) else torch.zeros_like(is_cls)
                decided = ~protect
                keep = self._gate_mask(k, x, protect, decided, None if calibrate is None else calibrate[k])
                if not self.config.reactivation and prev is not None:
                    keep = keep * prev if keep.is_floating_point() else keep & prev
                prev = keep
                masks.append(keep)
                decided_rows.append(decided)
            counts = None if keep is None else keep_counts(keep, layout)
            kept_cols.append(lengths if counts is None else counts.cpu())
            x = runner(block, x, keep, backend, counts)
        usage = TokenUsage(torch.stack(kept_cols, 1), lengths, self.config.gate_blocks, masks, decided_rows)
        return x, usage

    def forward_features(self, images: Images) -> tuple[Tensor | Packed, TokenUsage]:
        """Images -> (normed features, usage). Features are ``[B, N, C]`` for a tensor batch and a
        ``Packed`` set (per-image ``N_i``) for a list of images."""
        x, usage = self.forward_tokens(self.embed(images))
        x = x.with_values(self.norm(x.values))
        return (x.to_dense() if isinstance(images, Tensor) else x), usage

    def forward_head(self, feats: Tensor | Packed, pre_logits: bool = False) -> Tensor:
        """Class token -> logits ``[B, num_classes]``."""
        cls = feats[:, 0] if isinstance(feats, Tensor) else feats.values[feats.layout.first_rows]
        return cls if pre_logits else self.head(cls)

    def forward(self, images: Images) -> Tensor:
        feats, _ = self.forward_features(images)
        return self.forward_head(feats)

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def calibrate_keep(self, images: Images, targets: Sequence[float] | None = None) -> list[float]:
        """Shift each gate's keep/prune logit bias so that, on ``images``, the batch-average keep
        fraction of gate ``l`` (over the tokens it decides on) equals ``targets[l]`` (default: the
        config's keep targets). Gates are calibrated in order, each on the feature map produced by
        the already calibrated earlier gates. Per-image counts still vary. Returns the fractions
        reached."""
        targets = list(self.config.keep_targets if targets is None else targets)
        if len(targets) != self.num_gates:
            raise ValueError(f"{len(targets)} targets for {self.num_gates} gates")
        saved = (self.execution, self.gates_open)
        self.execution, self.gates_open = "packed", False
        try:
            _, usage = self.forward_tokens(self.embed(images), calibrate=targets)
        finally:
            self.execution, self.gates_open = saved
        return usage.gate_keep_fraction().tolist()


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
