"""Model configuration as data: the ViT's architecture (``ViTConfig``) and the pruning method acting on
it (``Pruning``). Nothing here knows a method: a method checks its own options when a model is built
(``methods/``).

Configs written before the pruning object existed were flat (``method``, ``gate_blocks``,
``keep_targets``, ``remove_pruned`` and nine per-method options as ``ViTConfig`` fields). They still
construct a ``ViTConfig`` (``ViTConfig(**old_dict)``, ``replace(config, gate_blocks=...)``): the flat
names are folded into ``pruning``; an option at its old default is simply left out.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

# flat names of the pruning object's fields in configs before it existed
LEGACY_PRUNING_FIELDS = {"method": "method", "gate_blocks": "blocks", "keep_targets": "keep_targets",
                         "remove_pruned": "remove_pruned"}
# flat per-method options of those configs, with the defaults they had (each method's options dataclass
# has the same default, so leaving a default out loses nothing)
LEGACY_OPTION_DEFAULTS: dict[str, Any] = {
    "prune_cls_last": True, "reactivation": True, "gate_norm_eps": 1e-5, "gate_tau": 1.0,  # svit (and dynamicvit eps)
    "fuse_token": False, "evit_preserve": "attention", "evo_tradeoff": 0.5, "tome_r": 0, "readout": "cls",
}


@dataclass(frozen=True)
class Pruning:
    """Which method prunes (``methods.METHODS``), the blocks it acts at (0-based), one keep target per
    such block, remove (``True``: rows not active at the end read as zero) vs preserve, and the method's
    own options: its options dataclass, or a dict of its fields (``None``: its defaults)."""

    method: str = "svit"
    blocks: tuple[int, ...] = ()
    keep_targets: tuple[float, ...] = ()
    remove_pruned: bool = False
    options: Mapping[str, Any] | Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        object.__setattr__(self, "keep_targets", tuple(float(t) for t in self.keep_targets))
        options = self.options
        if dataclasses.is_dataclass(options) and not isinstance(options, type):
            options = dataclasses.asdict(options)
        object.__setattr__(self, "options", dict(options or {}))
        if len(self.blocks) != len(self.keep_targets):
            raise ValueError(f"{len(self.blocks)} pruning blocks but {len(self.keep_targets)} keep targets")
        if list(self.blocks) != sorted(set(self.blocks)):
            raise ValueError(f"pruning blocks {self.blocks} must be increasing block indices")
        if any(not 0.0 <= t <= 1.0 for t in self.keep_targets):
            raise ValueError(f"keep targets {self.keep_targets} must lie in [0, 1]")

    def with_options(self, **changes: Any) -> "Pruning":
        """A copy with options changed; an option set to its old flat default is dropped."""
        options = dict(self.options)
        for key, value in changes.items():
            if key in LEGACY_OPTION_DEFAULTS and value == LEGACY_OPTION_DEFAULTS[key]:
                options.pop(key, None)
            else:
                options[key] = value
        return dataclasses.replace(self, options=options)


_ARCHITECTURE_DEFAULTS: dict[str, Any] = {
    "depth": 12, "patch_size": 16, "img_size": 224, "in_chans": 3,
    "class_token": True,  # False: no class token (detection backbones)
    "mlp_ratio": 4.0, "num_classes": 1000,
    "block_norm_eps": 1e-6,  # timm; the official SViT blocks (nn.TransformerEncoderLayer) use 1e-5
    "norm_eps": 1e-6,
}


@dataclass(frozen=True, init=False)
class ViTConfig:
    """The ViT's architecture and the ``pruning`` acting on it. ``gate_blocks``, ``keep_targets``,
    ``method`` and ``remove_pruned`` read the pruning object; the constructor also takes the flat names
    of older configs (see the module docstring)."""

    embed_dim: int
    num_heads: int
    depth: int
    patch_size: int
    img_size: int
    in_chans: int
    class_token: bool
    mlp_ratio: float
    num_classes: int
    block_norm_eps: float
    norm_eps: float
    pruning: Pruning = field(default_factory=Pruning)

    def __init__(self, embed_dim: int, num_heads: int, pruning: Pruning | Mapping | None = None, **kwargs: Any):
        flat = {k: kwargs.pop(k) for k in list(kwargs) if k in LEGACY_PRUNING_FIELDS or k in LEGACY_OPTION_DEFAULTS}
        unknown = sorted(set(kwargs) - set(_ARCHITECTURE_DEFAULTS))
        if unknown:
            raise TypeError(f"ViTConfig got unknown field(s) {unknown}")
        values = {**_ARCHITECTURE_DEFAULTS, **kwargs, "embed_dim": embed_dim, "num_heads": num_heads}
        for name, value in values.items():
            object.__setattr__(self, name, value)
        if isinstance(pruning, Mapping):
            pruning = Pruning(**pruning)
        pruning = pruning or Pruning()
        renamed = {LEGACY_PRUNING_FIELDS[k]: v for k, v in flat.items() if k in LEGACY_PRUNING_FIELDS}
        if renamed:
            pruning = dataclasses.replace(pruning, **renamed)
        options = {k: v for k, v in flat.items() if k in LEGACY_OPTION_DEFAULTS}
        if options:
            pruning = pruning.with_options(**options)
        object.__setattr__(self, "pruning", pruning)
        if any(not 0 <= b < self.depth for b in pruning.blocks):
            raise ValueError(f"pruning blocks {pruning.blocks} must be block indices in [0, {self.depth})")

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "ViTConfig":
        """A config as ``dataclasses.asdict`` wrote it, or the flat dict of an older file."""
        return ViTConfig(**dict(d))

    # ------------------------------------------------------------------ the pruning object, read flat
    @property
    def method(self) -> str:
        return self.pruning.method

    @property
    def gate_blocks(self) -> tuple[int, ...]:
        """Blocks the method acts at (SViT: each preceded by a gate)."""
        return self.pruning.blocks

    @property
    def keep_targets(self) -> tuple[float, ...]:
        return self.pruning.keep_targets

    @property
    def remove_pruned(self) -> bool:
        return self.pruning.remove_pruned

    # ------------------------------------------------------------------ geometry
    @property
    def grid(self) -> tuple[int, int]:
        return self.img_size // self.patch_size, self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Rows of ``pos_embed``: the class row is kept even without a class token (checkpoint layout)."""
        g = self.grid
        return 1 + g[0] * g[1]
