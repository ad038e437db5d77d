"""Named detectors: ``create_detector(name, **overrides)`` and ``list_detectors()``.

``vit_adapter_{tiny,small}_maskrcnn``: dense ViT-Adapter Mask R-CNN (DeiT blocks, LayerNorm eps 1e-6).
``svit_adapter_{tiny,small}_maskrcnn``: the same with 9 SViT gates before blocks 3-11 (official
``SelectiveViTAdapter``; its blocks are ``nn.TransformerEncoderLayer``, eps 1e-5).
"""
from __future__ import annotations

from dataclasses import fields, replace

from ..config import ViTConfig
from ..registry import SVIT_GATE_BLOCKS, SVIT_KEEP_TARGETS
from .config import DetectorConfig
from .detector import MaskRCNNDetector

_WIDTHS = {"tiny": (192, 3), "small": (384, 6)}
_DETECTORS: dict[str, DetectorConfig] = {}
for _size, (_dim, _heads) in _WIDTHS.items():
    _vit = dict(embed_dim=_dim, num_heads=_heads, class_token=False, num_classes=0)
    _DETECTORS[f"vit_adapter_{_size}_maskrcnn"] = DetectorConfig(vit=ViTConfig(**_vit, block_norm_eps=1e-6))
    _DETECTORS[f"svit_adapter_{_size}_maskrcnn"] = DetectorConfig(vit=ViTConfig(
        **_vit, block_norm_eps=1e-5, gate_blocks=SVIT_GATE_BLOCKS, keep_targets=SVIT_KEEP_TARGETS,
        prune_cls_last=False))

_VIT_OVERRIDES = {"depth", "gate_blocks", "keep_targets", "reactivation", "block_norm_eps", "gate_tau", "embed_dim",
                  "num_heads"}


def list_detectors() -> list[str]:
    return sorted(_DETECTORS)


def is_detector(name: str) -> bool:
    return name in _DETECTORS


def dense_detector(name: str) -> str:
    """``svit_adapter_small_maskrcnn`` -> ``vit_adapter_small_maskrcnn``."""
    if name not in _DETECTORS:
        raise ValueError(f"unknown detector {name!r}; available: {', '.join(list_detectors())}")
    return name[1:] if name.startswith("svit_") else name


def get_detector_config(name: str, **overrides) -> DetectorConfig:
    """Overrides: any ``DetectorConfig`` field (``num_classes``, ``img_scale``, ``class_names``, ...) and
    the ViT fields in ``_VIT_OVERRIDES`` (small test models, keep targets, ...)."""
    if name not in _DETECTORS:
        raise ValueError(f"unknown detector {name!r}; available: {', '.join(list_detectors())}")
    cfg = _DETECTORS[name]
    vit_over = {k: overrides.pop(k) for k in list(overrides) if k in _VIT_OVERRIDES}
    known = {f.name for f in fields(DetectorConfig)} - {"vit"}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown detector option(s) {bad}; known: {sorted(known | _VIT_OVERRIDES)}")
    for key in ("gate_blocks", "keep_targets"):
        if key in vit_over:
            vit_over[key] = tuple(vit_over[key])
    if "img_scale" in overrides:
        overrides["img_scale"] = tuple(int(v) for v in overrides["img_scale"])
    if "class_names" in overrides:
        overrides["class_names"] = tuple(overrides["class_names"])
    return replace(cfg, vit=replace(cfg.vit, **vit_over), **overrides)


def create_detector(name: str, **overrides) -> MaskRCNNDetector:
    """Build a detector with random weights; load weights with ``nested_svit.load_checkpoint``."""
    model = MaskRCNNDetector(get_detector_config(name, **overrides))
    model.name = name
    return model
