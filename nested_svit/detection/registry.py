"""Named detectors: ``create_detector(name, **overrides)`` and ``list_detectors()``.

``vit_adapter_{tiny,small}_maskrcnn``: dense ViT-Adapter Mask R-CNN (DeiT blocks, LayerNorm eps 1e-6).
``svit_adapter_{tiny,small}_maskrcnn``: the same with 9 SViT gates before blocks 3-11 (official
``SelectiveViTAdapter``; its blocks are ``nn.TransformerEncoderLayer``, eps 1e-5).
``{dynamicvit,evit,evovit,ats}_adapter_{tiny,small}_maskrcnn``: the paper's baselines as backbones
(Tables 2 and 5), DeiT blocks (eps 1e-6). Choices the paper leaves open, made here and switchable by
overrides: the total pruning rate of SViT's targets (blocks 3-5 keep 0.7, 6-8 0.49, 9-11 0.343 of the
tokens): DynamicViT and EViT prune at 3/6/9 with rate 0.7, Evo-ViT re-selects before every block 3-11
with SViT's per-block targets (the per-layer variant of the authors' detection code), ATS samples in
blocks 3-11 (its count is data-dependent); EViT fuses (``fuse_token``) and its dropped tokens keep
their post-attention value (``evit_preserve``); tokens are preserved (``remove_pruned=True``: the
extractors and the output read dropped tokens as zero, the injectors still update every token).
EViT, Evo-ViT and ATS get a randomly initialised class token that the adapter never sees.
``{atc,tome}_adapter_{tiny,small}_maskrcnn``: ATC's detection backbones (its ``MMDet_setup``,
``tomeatc-adapter-{t,s}``): blocks 3/6/9 merge to ``int(0.7 t)`` of the ``t`` tokens they get (ATC:
average linkage, ``linkage=`` for the others; ToMe: bipartite matching), proportional attention; the
injectors and extractors see the full grid (every token its cluster's value) and the injected grid is
merged back into the clusters (their means), as the authors' unmerge / re-merge do.
"""
from __future__ import annotations

from dataclasses import fields, replace

from ..config import Pruning, ViTConfig
from ..methods import get_method
from ..registry import PRUNING_OVERRIDES, SVIT_GATE_BLOCKS, SVIT_KEEP_TARGETS, WIDTHS
from .config import DetectorConfig
from .detector import MaskRCNNDetector

_SIZES = ("tiny", "small")  # ViT-Adapter's released widths
_BASELINES = {
    "dynamicvit": Pruning("dynamicvit", (3, 6, 9), (0.7, 0.7 ** 2, 0.7 ** 3)),
    "evit": Pruning("evit", (3, 6, 9), (0.7,) * 3, options={"fuse_token": True}),
    "evovit": Pruning("evovit", SVIT_GATE_BLOCKS, SVIT_KEEP_TARGETS),
    "ats": Pruning("ats", SVIT_GATE_BLOCKS, (1.0,) * 9),
    # ATC's MMDet_setup (tomeatc-adapter-*): 0.7 of the tokens each of blocks 3/6/9 gets, no class token
    "atc": Pruning("atc", (3, 6, 9), (0.7,) * 3, options={"linkage": "average", "of_current": True}),
    "tome": Pruning("tome", (3, 6, 9), (0.7,) * 3, options={"of_current": True}),
}
_DETECTORS: dict[str, DetectorConfig] = {}
_DENSE: dict[str, str] = {}  # detector -> the dense ViT-Adapter of the same width
for _size in _SIZES:
    _dim, _heads = WIDTHS[_size]
    _vit = dict(embed_dim=_dim, num_heads=_heads, class_token=False, num_classes=0)
    _dense = f"vit_adapter_{_size}_maskrcnn"
    _DETECTORS[_dense] = DetectorConfig(vit=ViTConfig(**_vit, block_norm_eps=1e-6))
    _DETECTORS[f"svit_adapter_{_size}_maskrcnn"] = DetectorConfig(vit=ViTConfig(
        **_vit, block_norm_eps=1e-5, pruning=Pruning("svit", SVIT_GATE_BLOCKS, SVIT_KEEP_TARGETS,
                                                     options={"prune_cls_last": False})))
    _DENSE[_dense] = _DENSE[f"svit_adapter_{_size}_maskrcnn"] = _dense
    for _prefix, _pruning in _BASELINES.items():
        _token = get_method(_pruning.method).needs_class_token  # an artificial class token to select with
        _DETECTORS[f"{_prefix}_adapter_{_size}_maskrcnn"] = DetectorConfig(vit=ViTConfig(
            **{**_vit, "class_token": _token}, block_norm_eps=1e-6, pruning=_pruning))
        _DENSE[f"{_prefix}_adapter_{_size}_maskrcnn"] = _dense

_VIT_OVERRIDES = {"depth", "block_norm_eps", "embed_dim", "num_heads", "pruning"} | set(PRUNING_OVERRIDES)


def list_detectors() -> list[str]:
    return sorted(_DETECTORS)


def is_detector(name: str | None) -> bool:
    return name in _DETECTORS


def dense_detector(name: str) -> str:
    """``svit_adapter_small_maskrcnn`` (or a baseline's) -> ``vit_adapter_small_maskrcnn``."""
    if name not in _DETECTORS:
        raise ValueError(f"unknown detector {name!r}; available: {', '.join(list_detectors())}")
    return _DENSE[name]


def get_detector_config(name: str, **overrides) -> DetectorConfig:
    """Overrides: any ``DetectorConfig`` field (``num_classes``, ``img_scale``, ``class_names``, ...) and
    the ViT fields in ``_VIT_OVERRIDES`` (small test models, keep targets, method options, ...)."""
    if name not in _DETECTORS:
        raise ValueError(f"unknown detector {name!r}; available: {', '.join(list_detectors())}")
    cfg = _DETECTORS[name]
    vit_over = {k: overrides.pop(k) for k in list(overrides) if k in _VIT_OVERRIDES}
    known = {f.name for f in fields(DetectorConfig)} - {"vit"}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown detector option(s) {bad}; known: {sorted(known | _VIT_OVERRIDES)}")
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
