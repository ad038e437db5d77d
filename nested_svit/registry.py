"""Named model configurations: ``build_model(name, **overrides)`` (random weights; the public
``create_model``, with timm's keyword arguments and checkpoints, is ``checkpoint.factory``'s) and
``list_models(pattern)``."""
from __future__ import annotations

import dataclasses

from .config import LEGACY_OPTION_DEFAULTS, LEGACY_PRUNING_FIELDS, Pruning, ViTConfig
from .data.transforms import DEIT_EVAL
from .methods import get_method
from .methods.diffrate import RATES, json_options
from .model import SparseViT

SVIT_GATE_BLOCKS = (3, 4, 5, 6, 7, 8, 9, 10, 11)
SVIT_KEEP_TARGETS = (0.7,) * 3 + (0.49,) * 3 + (0.343,) * 3

WIDTHS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}  # (embed dim, heads); detectors use them too
# a ViT's attention heads by its width, as timm's and DeiT's models have them (a file that does not say)
HEADS_BY_WIDTH = {**{dim: heads for dim, heads in WIDTHS.values()}, 64: 2, 1024: 16, 1280: 16}

_MODELS: dict[str, ViTConfig] = {}
_DENSE: dict[str, str] = {}  # model -> the dense model of the same width (speed-ups are measured against it)
for _size, (_dim, _heads) in WIDTHS.items():
    _deit = f"deit_{_size}_patch16_224"
    _MODELS[_deit] = ViTConfig(embed_dim=_dim, num_heads=_heads)
    _MODELS[f"svit_{_size}"] = ViTConfig(embed_dim=_dim, num_heads=_heads,
                                         pruning=Pruning("svit", SVIT_GATE_BLOCKS, SVIT_KEEP_TARGETS))
    _DENSE[_deit] = _DENSE[f"svit_{_size}"] = _deit

# The paper's baselines on the same engine (nested_svit/methods; ../shared/specs/baselines.md), at the
# authors' release configurations; block indices 0-based. Tiny/base where the authors released them.
_RHO = (0.7, 0.7 ** 2, 0.7 ** 3)
_BASELINES = {
    "dynamicvit": (("small", "base"), Pruning("dynamicvit", (3, 6, 9), _RHO)),
    "evit": (("small",), Pruning("evit", (3, 6, 9), (0.7,) * 3, options={"fuse_token": True})),
    "evit_nofuse": (("small",), Pruning("evit", (3, 6, 9), (0.7,) * 3)),
    "evovit": (("tiny", "small", "base"), Pruning("evovit", (4, 8), (0.5, 0.5), options={"readout": "mean"})),
    "ats": (("small",), Pruning("ats", tuple(range(3, 12)), (1.0,) * 9)),
    "tome": (("tiny", "small"), Pruning("tome", tuple(range(12)), (1.0,) * 12, options={"r": 13})),
    # ATC (ECCV 2024): keep rate 0.7 at blocks 3, 6, 9, one name per linkage (the authors' default: average)
    **{name: (("tiny", "small", "base"),
              Pruning("atc", (3, 6, 9), _RHO, options={"linkage": linkage, "proportional_attn": True}))
       for name, linkage in (("atc", "average"), ("atc_single", "single"), ("atc_complete", "complete"))},
    # MCTF (CVPR 2024) as its eval scripts run it: r = 16 at blocks 1-11; MCTF-Fast: r = 0.35 at 3, 6, 9
    "mctf": (("tiny", "small"), Pruning("mctf", tuple(range(1, 12)), (1.0,) * 11, options={"r": 16})),
    "mctf_fast": (("tiny", "small"), Pruning("mctf", (3, 6, 9), (1.0,) * 3, options={"r": 0.35})),
}
for _prefix, (_sizes, _pruning) in _BASELINES.items():
    for _size in _sizes:
        _dim, _heads = WIDTHS[_size]
        _MODELS[f"{_prefix}_{_size}"] = ViTConfig(embed_dim=_dim, num_heads=_heads, pruning=_pruning)
        _DENSE[f"{_prefix}_{_size}"] = f"deit_{_size}_patch16_224"
# DiffRate (ICCV 2023) on plain DeiT weights at its json's rates: ``diffrate_{size}_{target}`` for every
# target GFLOPs of the json, ``diffrate_{size}`` at its README's (DeiT-S 2.9, DeiT-B 11.5; DeiT-T 1.0)
for _size, _default in (("tiny", "1.0"), ("small", "2.9"), ("base", "11.5")):
    _dim, _heads = WIDTHS[_size]
    for _target in (*RATES[_size], ""):
        _name = f"diffrate_{_size}_{_target}".rstrip("_")
        _MODELS[_name] = ViTConfig(embed_dim=_dim, num_heads=_heads, pruning=Pruning(
            "diffrate", tuple(range(12)), (1.0,) * 12, options=json_options(_size, _target or _default)))
        _DENSE[_name] = f"deit_{_size}_patch16_224"

# A small ViT for 32x32 inputs (the digits experiment in eval/; its SViT checkpoint ships with the package).
_DIGITS = dict(embed_dim=64, num_heads=2, depth=12, patch_size=4, img_size=32, num_classes=10)
_MODELS["vit_digits"] = ViTConfig(**_DIGITS)
_MODELS["svit_digits"] = ViTConfig(**_DIGITS, pruning=Pruning("svit", SVIT_GATE_BLOCKS, SVIT_KEEP_TARGETS))
_DENSE["vit_digits"] = _DENSE["svit_digits"] = "vit_digits"

# Eval preprocessing per model (as timm's pretrained configs carry it; the input size is the config's)
_EVAL_DEFAULTS: dict[str, dict] = {"vit_digits": {"crop_pct": 1.0}, "svit_digits": {"crop_pct": 1.0}}

# what ``get_config`` overrides take besides ViTConfig's fields: the pruning object's fields under their
# config names, and the methods' options under their old flat names
PRUNING_OVERRIDES = tuple(LEGACY_PRUNING_FIELDS) + tuple(LEGACY_OPTION_DEFAULTS)


def eval_config(name: str | None) -> dict:
    """The eval preprocessing a model of this name was trained for, as timm's ``pretrained_cfg``:
    ``crop_pct``, ``interpolation``, ``mean``, ``std`` (DeiT's: 0.875, bicubic, ImageNet's; any other
    name, or none: the same). The input size is the model's ``config.img_size``."""
    return {**DEIT_EVAL, **_EVAL_DEFAULTS.get(name or "", {})}


def list_models(pattern: str = "") -> list[str]:
    """Registered classifier names, those matching ``pattern`` (a shell wildcard, as timm's) if given."""
    import fnmatch

    return sorted(n for n in _MODELS if not pattern or fnmatch.fnmatch(n, pattern))


def get_config(name: str, **overrides) -> ViTConfig:
    """The named config with ``overrides``: any ``ViTConfig`` field (``img_size``, ``num_classes``, a
    whole ``pruning``), ``gate_blocks`` / ``keep_targets`` / ``method`` / ``remove_pruned``, and method
    options by their flat names (``fuse_token``, ``reactivation``, ...; checked by the method when the
    model is built)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    known = {f.name for f in dataclasses.fields(ViTConfig)} | set(PRUNING_OVERRIDES)
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown config field(s) {bad}; known: {sorted(known)}")
    return dataclasses.replace(_MODELS[name], **overrides)


def dense_counterpart(name: str) -> str:
    """``svit_small`` (or any baseline of that width) -> ``deit_small_patch16_224`` (same width, dense)."""
    if name not in _DENSE:
        raise ValueError(f"no dense counterpart known for {name!r}")
    return _DENSE[name]


def model_for(pruning: Pruning, embed_dim: int) -> tuple[str | None, dict]:
    """The named model of this width whose method (and options) ``pruning`` is, and the overrides that
    give it ``pruning``'s blocks and keep targets: ``(name, {"keep_targets": ...})``; (None, {}) if none."""
    names = [n for n, c in _MODELS.items() if c.pruning.method == pruning.method and c.embed_dim == embed_dim]
    if not names:
        return None, {}
    wanted = _full_options(pruning)
    exact = [n for n in names if _full_options(_MODELS[n].pruning) == wanted]
    exact = [n for n in exact if _MODELS[n].pruning.blocks == pruning.blocks] or exact  # MCTF vs MCTF-Fast
    name = (exact or names)[0]
    cfg = _MODELS[name].pruning
    overrides: dict = {} if exact else {"pruning": pruning}
    if not overrides and cfg.blocks != pruning.blocks:
        overrides["gate_blocks"] = pruning.blocks
    if not overrides and cfg.keep_targets != pruning.keep_targets:
        overrides["keep_targets"] = tuple(round(t, 6) for t in pruning.keep_targets)
    return name, overrides


def _full_options(pruning: Pruning) -> object:
    """``pruning``'s options with the method's defaults filled in (equal options, however written)."""
    try:
        return get_method(pruning.method).options(**pruning.options)
    except TypeError:  # an option the method does not have: compared as written
        return dict(pruning.options)


def build_model(name: str, **overrides) -> SparseViT:
    """Build a model with random weights; load weights with ``nested_svit.load_checkpoint``."""
    model = SparseViT(get_config(name, **overrides))
    model.name = name
    model.pretrained_cfg = eval_config(name)
    return model
