"""Detector checkpoints: ``load_checkpoint`` for ``MaskRCNNDetector`` (registered on import), the
detector writer, and the detector a file of ours carries.

Formats (``checkpoint/convert.py`` detects and converts the layouts):
* ``mmdet-svit`` / ``mmdet-dense``: the official SViT / ViT-Adapter runner files
  (``{"meta", "state_dict", "optimizer"?}``); our heads keep mmdet's layout (background is the last
  class logit, 80 mask channels), so the class layout needs no conversion.
* ``nested_svit``: what ``save_detector_checkpoint`` and the detector trainer write (``checkpoint/
  writer.py``): our names, the model config and the blocks' LayerNorm eps.
* ``imagenet``: a classification state dict (DeiT/timm, official SViT, a baseline's release or a
  classifier of ours) with no ``backbone.`` prefix: patch embedding, position table and blocks go into
  the backbone; everything else keeps its initialisation (how detector training starts).
"""
from __future__ import annotations

import os
import re

from torch import Tensor

from ..checkpoint import CheckpointError, LoadReport, file_info, load_checkpoint, read, save_checkpoint
from ..checkpoint.convert import BLOCK_EPS, convert, detect_format
from ..checkpoint.keys import calibration_notes, check_keys, fit_pos_embed, key_listing, mis_shaped
from .config import DetectorConfig
from .detector import MaskRCNNDetector

_IMAGENET_KEEP = re.compile(r"(patch_embed\.|pos_embed$|blocks\.)")
_IMAGENET_IGNORED = ("cls_token", "dist_token", "norm.", "fc_norm.", "head.", "head_dist.", "pre_logits.")


def detector_format(top: dict, state: dict[str, Tensor]) -> str:
    """``nested_svit`` (a detector file of ours), ``mmdet-svit`` / ``mmdet-dense``, or ``imagenet`` (any
    classification file: backbone weights only)."""
    if top.get("format") == "nested_svit" and top.get("kind", "detector") == "detector":
        return "nested_svit"
    fmt = detect_format(state)
    return fmt if fmt.startswith("mmdet") else "imagenet"


def checkpoint_kind(source: str | os.PathLike) -> str | None:
    """``detector_format`` of a file, from a memory-mapped peek (None: unreadable; the loader says why)."""
    from ..checkpoint.reader import peek, unwrap

    top = peek(source)
    try:
        return detector_format(top, unwrap(top)) if top is not None else None
    except CheckpointError:
        return None


def checkpoint_classes(source: str | os.PathLike | None) -> int | None:
    """How many classes a detector checkpoint file predicts (its box head's logits less background, or
    the config it carries); None for a file without a detector head."""
    info = file_info(source)
    if info.kind == "detector":
        return int(info.model_config["num_classes"])
    if info.kind is not None:
        return None
    from ..checkpoint.reader import peek, unwrap

    top = peek(source)
    try:
        state = unwrap(top) if top is not None else {}
    except CheckpointError:
        return None
    weight = state.get("roi_head.bbox_head.fc_cls.weight")
    return int(weight.shape[0]) - 1 if weight is not None else None


@load_checkpoint.register
def load_detector_checkpoint(model: MaskRCNNDetector, source: str | os.PathLike | dict, strict: bool = True
                             ) -> LoadReport:
    """Load any format above into ``model`` in place; one error lists every key that does not fit."""
    ckpt = read(source)
    fmt = detector_format(ckpt.top, ckpt.state)
    report = LoadReport(fmt, ckpt.desc, ckpt.sha256, notes=calibration_notes(ckpt.top))
    own = model.state_dict()
    if fmt == "imagenet":
        state, eps = _imagenet_backbone(model, ckpt.state, ckpt.desc, report, strict)
    else:
        state = dict(ckpt.state) if fmt == "nested_svit" else _without_classifier(own, convert(ckpt.state, fmt), report)
        eps = float(ckpt.top.get("block_norm_eps", model.config.vit.block_norm_eps)) if fmt == "nested_svit" \
            else BLOCK_EPS[fmt]
    fit_pos_embed(state, own, "backbone.pos_embed", report)
    if fmt == "imagenet":
        wrong = mis_shaped(own, state)
        if wrong:  # e.g. DeiT-B weights for a DeiT-S backbone
            raise CheckpointError(key_listing(f"checkpoint {ckpt.desc} does not fit the ViT of detector {model.name!r}",
                                              [("mis-shaped", wrong)]))
        model.load_state_dict(state, strict=False)
    else:
        ignore = _dense_file_gaps(model, own, state, fmt, report)
        if strict:
            check_keys(f"checkpoint {ckpt.desc} ({fmt} format) does not fit detector {model.name!r}", own, state, ignore)
        model.load_state_dict({k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False)
    for block in model.backbone.blocks:
        block.set_eps(eps)
    if eps != model.config.vit.block_norm_eps:
        report.notes.append(f"block LayerNorm eps set to {eps} ({fmt} format)")
    return report


def _imagenet_backbone(model: MaskRCNNDetector, raw: dict[str, Tensor], desc: str, report: LoadReport, strict: bool
                       ) -> tuple[dict[str, Tensor], float]:
    """A classification state dict -> the backbone's patch embedding, position table and blocks."""
    inner_fmt = detect_format(raw)
    converted = convert(raw, inner_fmt)
    state = {f"backbone.{k}": v for k, v in converted.items() if _IMAGENET_KEEP.match(k)}
    ignored = sorted(k for k in converted if not _IMAGENET_KEEP.match(k))
    unknown = [k for k in ignored if not k.startswith(_IMAGENET_IGNORED) and not k.startswith("gates.")]
    if unknown and strict:
        raise CheckpointError(key_listing(f"checkpoint {desc} (ImageNet {inner_fmt} format) has keys that fit no "
                                          f"part of detector {model.name!r}", [("unexpected", unknown)]))
    if not state:
        raise CheckpointError(f"checkpoint {desc} holds no backbone weights (no patch_embed / pos_embed / blocks)")
    if ignored:
        report.notes.append(f"ImageNet checkpoint: ignored {len(ignored)} classification keys ({', '.join(ignored[:6])}"
                            + (" ..." if len(ignored) > 6 else "") + ")")
    own = model.state_dict()
    missing = sorted(k for k in own if k.startswith("backbone.") and _IMAGENET_KEEP.match(k[len("backbone."):])
                     and k not in state)
    if missing and strict:
        raise CheckpointError(key_listing(f"checkpoint {desc} does not fit the ViT of detector {model.name!r}",
                                          [("missing", missing)]))
    report.notes.append("ImageNet checkpoint: adapter, gates, neck and heads keep their initialisation")
    return state, BLOCK_EPS[inner_fmt]


def _without_classifier(own: dict, state: dict[str, Tensor], report: LoadReport) -> dict[str, Tensor]:
    """An mmdet file whose backbone kept timm's classifier parts (ATC's ``ToMeATCViTAdapter``: class token,
    final norm, head), which no adapter layer reads: dropped, and noted."""
    extra = sorted(k for k in state if k not in own and k.startswith("backbone.")
                   and k[len("backbone."):].startswith(_IMAGENET_IGNORED))
    if extra:
        report.notes.append(f"ignored {len(extra)} backbone classifier keys no adapter layer reads "
                            f"({', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''})")
    return {k: v for k, v in state.items() if k not in extra}


def _dense_file_gaps(model: MaskRCNNDetector, own: dict, state: dict, fmt: str, report: LoadReport) -> set[str]:
    """A dense detector file in a pruned detector: its selectors (and the artificial class token of the
    attention-based baselines) keep their initialisation, noted. -> the keys that may be missing."""
    missing = set(own) - set(state)
    gaps = {k for k in missing if k.startswith("backbone.gates.") or k == "backbone.cls_token"}
    if fmt not in ("mmdet-dense", "nested_svit") or not gaps or gaps != missing:
        return set()
    title = model.backbone.method.title
    if model.backbone.num_gates:
        report.notes.append(f"dense detector checkpoint: {model.backbone.num_gates} gates keep their "
                            f"initialisation ({title} selectors)")
    if "backbone.cls_token" in gaps:
        report.notes.append(f"dense detector checkpoint: the class token {title} selects with is randomly "
                            "initialised (as the SViT authors did)")
    return gaps


def save_detector_checkpoint(model: MaskRCNNDetector, path: str | os.PathLike, **extra) -> None:
    """``checkpoint.save_checkpoint`` of a detector (weights, model name, config with the class names,
    the blocks' LayerNorm eps); loads with ``weights_only=True`` into ``load_checkpoint`` and
    ``detector_from_file``."""
    save_checkpoint(model, path, **extra)


def detector_from_file(source: str | os.PathLike | None) -> tuple[str | None, DetectorConfig] | None:
    """(model name, ``DetectorConfig``) a file of ours carries, else None."""
    info = file_info(source)
    if info.kind != "detector":
        return None
    return info.model_name, DetectorConfig.from_dict(info.model_config)


__all__ = ["load_detector_checkpoint", "save_detector_checkpoint", "detector_format", "detector_from_file"]
