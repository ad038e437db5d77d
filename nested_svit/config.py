"""Model configuration: architecture, where gates sit, and their keep-ratio targets (data, not code)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ViTConfig:
    embed_dim: int
    num_heads: int
    depth: int = 12
    patch_size: int = 16
    img_size: int = 224
    in_chans: int = 3
    class_token: bool = True  # False: no class token, nothing protected (detection backbones)
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    gate_blocks: tuple[int, ...] = ()  # 0-based block indices preceded by a gate
    keep_targets: tuple[float, ...] = ()  # one target keep ratio per gate
    prune_cls_last: bool = True  # the last gate may prune the class token (official release)
    reactivation: bool = True  # False: keep_l <- keep_l & keep_{l-1} (paper's ablation)
    block_norm_eps: float = 1e-6  # timm; the official SViT blocks (nn.TransformerEncoderLayer) use 1e-5
    norm_eps: float = 1e-6
    gate_norm_eps: float = 1e-5
    gate_tau: float = 1.0
    # the pruning method (nested_svit/methods): "svit" (gates; dense without gate_blocks), "dynamicvit",
    # "evit", "evovit", "ats"; gate_blocks are where it acts, keep_targets its per-stage keep rates
    method: str = "svit"
    fuse_token: bool = False  # evit: dropped tokens fused into one extra token per stage
    evit_preserve: str = "attention"  # evit: a dropped token keeps its post-attention value, or "input"
    evo_tradeoff: float = 0.5  # evovit: score <- (1 - t) score + t attention after the first selection
    tome_r: int = 0  # tome: tokens merged per block
    readout: str = "cls"  # classifier head input: "cls" token, or "mean" of patch tokens then norm (evovit)
    remove_pruned: bool = False  # True: rows not active at the end are zero in the output map ("remove")

    def __post_init__(self) -> None:
        from .methods import METHODS

        if self.method not in METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}; choose from {METHODS}")
        if self.readout not in ("cls", "mean"):
            raise ValueError(f"readout must be 'cls' or 'mean', not {self.readout!r}")
        if self.evit_preserve not in ("attention", "input"):
            raise ValueError(f"evit_preserve must be 'attention' or 'input', not {self.evit_preserve!r}")
        if self.method != "svit" and not self.class_token and self.method != "dynamicvit":
            raise ValueError(f"{self.method} selects with the class token's attention: it needs class_token=True")
        if len(self.gate_blocks) != len(self.keep_targets):
            raise ValueError(f"{len(self.gate_blocks)} gates but {len(self.keep_targets)} keep targets")
        if any(not 0 <= b < self.depth for b in self.gate_blocks) or list(self.gate_blocks) != sorted(set(self.gate_blocks)):
            raise ValueError(f"gate_blocks {self.gate_blocks} must be increasing block indices in [0, {self.depth})")
        if any(not 0.0 <= t <= 1.0 for t in self.keep_targets):
            raise ValueError(f"keep targets {self.keep_targets} must lie in [0, 1]")

    @property
    def grid(self) -> tuple[int, int]:
        return self.img_size // self.patch_size, self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Rows of ``pos_embed``: the class row is kept even without a class token (checkpoint layout)."""
        g = self.grid
        return 1 + g[0] * g[1]
