"""Named model configurations: ``create_model(name, **overrides)`` and ``list_models()``."""
from __future__ import annotations

from dataclasses import fields, replace

from .config import ViTConfig
from .model import SparseViT

SVIT_GATE_BLOCKS = (3, 4, 5, 6, 7, 8, 9, 10, 11)
SVIT_KEEP_TARGETS = (0.7,) * 3 + (0.49,) * 3 + (0.343,) * 3

_WIDTHS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}

_MODELS: dict[str, ViTConfig] = {}
for _size, (_dim, _heads) in _WIDTHS.items():
    _MODELS[f"deit_{_size}_patch16_224"] = ViTConfig(embed_dim=_dim, num_heads=_heads)
    _MODELS[f"svit_{_size}"] = ViTConfig(embed_dim=_dim, num_heads=_heads, gate_blocks=SVIT_GATE_BLOCKS,
                                         keep_targets=SVIT_KEEP_TARGETS)


def list_models() -> list[str]:
    return sorted(_MODELS)


def get_config(name: str, **overrides) -> ViTConfig:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    known = {f.name for f in fields(ViTConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown config field(s) {bad}; known: {sorted(known)}")
    for key in ("gate_blocks", "keep_targets"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return replace(_MODELS[name], **overrides)


def dense_counterpart(name: str) -> str:
    """``svit_small`` -> ``deit_small_patch16_224`` (same width, no gates)."""
    for size in _WIDTHS:
        if name in (f"svit_{size}", f"deit_{size}_patch16_224"):
            return f"deit_{size}_patch16_224"
    raise ValueError(f"no dense counterpart known for {name!r}")


def create_model(name: str, **overrides) -> SparseViT:
    """Build a model with random weights; load weights with ``nested_svit.load_checkpoint``."""
    model = SparseViT(get_config(name, **overrides))
    model.name = name
    return model
