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

# The paper's baselines on the same engine (nested_svit/methods; ../shared/specs/baselines.md), at the
# authors' release configurations; block indices 0-based. Tiny/base where the authors released them.
_RHO = (0.7, 0.7 ** 2, 0.7 ** 3)
_BASELINES = {
    "dynamicvit": (("small", "base"), dict(method="dynamicvit", gate_blocks=(3, 6, 9), keep_targets=_RHO)),
    "evit": (("small",), dict(method="evit", gate_blocks=(3, 6, 9), keep_targets=(0.7,) * 3, fuse_token=True)),
    "evit_nofuse": (("small",), dict(method="evit", gate_blocks=(3, 6, 9), keep_targets=(0.7,) * 3)),
    "evovit": (("tiny", "small", "base"), dict(method="evovit", gate_blocks=(4, 8), keep_targets=(0.5, 0.5),
                                               readout="mean")),
    "ats": (("small",), dict(method="ats", gate_blocks=tuple(range(3, 12)), keep_targets=(1.0,) * 9)),
    "tome": (("tiny", "small"), dict(method="tome", gate_blocks=tuple(range(12)), keep_targets=(1.0,) * 12,
                                     tome_r=13)),
}
for _method, (_sizes, _fields) in _BASELINES.items():
    for _size in _sizes:
        _dim, _heads = _WIDTHS[_size]
        _MODELS[f"{_method}_{_size}"] = ViTConfig(embed_dim=_dim, num_heads=_heads, **_fields)

# A small ViT for 32x32 inputs (the digits experiment in eval/; its SViT checkpoint ships with the package).
_DIGITS = dict(embed_dim=64, num_heads=2, depth=12, patch_size=4, img_size=32, num_classes=10)
_MODELS["vit_digits"] = ViTConfig(**_DIGITS)
_MODELS["svit_digits"] = ViTConfig(**_DIGITS, gate_blocks=SVIT_GATE_BLOCKS, keep_targets=SVIT_KEEP_TARGETS)

# Eval preprocessing per model (as timm's pretrained configs carry it): input size and crop_pct.
_EVAL_DEFAULTS: dict[str, dict] = {"vit_digits": {"img_size": 32, "crop_pct": 1.0},
                                   "svit_digits": {"img_size": 32, "crop_pct": 1.0}}


def eval_defaults(name: str) -> dict:
    """``{"img_size", "crop_pct"}`` of the model's eval transform (DeiT: 224, 0.875)."""
    return {"img_size": get_config(name).img_size, "crop_pct": 0.875, **_EVAL_DEFAULTS.get(name, {})}


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
    """``svit_small`` (or any baseline of that width) -> ``deit_small_patch16_224`` (same width, dense)."""
    for size in _WIDTHS:
        if name in (f"svit_{size}", f"deit_{size}_patch16_224") or any(name == f"{m}_{size}" for m in _BASELINES):
            return f"deit_{size}_patch16_224"
    if name in ("vit_digits", "svit_digits"):
        return "vit_digits"
    raise ValueError(f"no dense counterpart known for {name!r}")


def create_model(name: str, **overrides) -> SparseViT:
    """Build a model with random weights; load weights with ``nested_svit.load_checkpoint``."""
    model = SparseViT(get_config(name, **overrides))
    model.name = name
    return model
