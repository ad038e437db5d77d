"""Load detector checkpoints: official mmcv files, our own files, and ImageNet DeiT/timm weights.

Formats (detected from the keys):
* ``mmdet-svit`` / ``mmdet-dense``: the official SViT / ViT-Adapter runner files
  (``{"meta", "state_dict", "optimizer"?}``; ``backbone.*``, ``neck.*``, ``rpn_head.*``, ``roi_head.*``).
  Gated blocks are ``nn.TransformerEncoderLayer`` (renamed to timm names, LayerNorm eps 1e-5), gates
  ``selective_modules.{k}`` -> ``gates.{k}``; dense blocks keep timm names (eps 1e-6). Our heads keep
  mmdet's layout (background is the last class logit, 80 mask channels), so the class layout needs no
  conversion.
* ``nested_svit``: what ``save_checkpoint`` writes: our names, the model config and the block eps.
* ``imagenet``: a DeiT/timm (or official SViT classification) state dict with no ``backbone.`` prefix:
  patch embedding, position table and blocks go into the backbone; everything else keeps its
  initialisation (how detector training starts).
"""
from __future__ import annotations

import os
import re

import torch
from torch import Tensor

from ..checkpoint import CheckpointError, LoadReport, convert, detect_format, read_checkpoint_file, sha256_of
from ..io import atomic_write
from ..layers import resize_pos_embed
from .detector import MaskRCNNDetector

_IMAGENET_KEEP = re.compile(r"(patch_embed\.|pos_embed$|blocks\.)")
_IMAGENET_IGNORED = ("cls_token", "dist_token", "norm.", "fc_norm.", "head.", "head_dist.", "pre_logits.")


def _read(source: str | os.PathLike | dict) -> tuple[dict, dict[str, Tensor], str, str | None]:
    """-> (top-level object, state dict, description, sha256)."""
    if isinstance(source, dict):
        top, desc, digest = source, "<state dict>", None
    else:
        top, desc, digest = read_checkpoint_file(source)
    if not isinstance(top, dict):
        raise CheckpointError(f"checkpoint {desc} is not a dict of tensors (found {type(top).__name__})")
    state = top
    for key in ("state_dict", "model"):
        if isinstance(top.get(key), dict):
            state = top[key]
            break
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not state:
        raise CheckpointError(f"checkpoint {desc} holds no tensors (looked at the top level, 'state_dict', 'model')")
    return top, state, desc, digest


def detector_format(top: dict, state: dict[str, Tensor]) -> str:
    if top.get("format") == "nested_svit":
        return "nested_svit"
    if any(k.startswith("backbone.") for k in state):
        return "mmdet-svit" if any(".TransformerEncoderLayer." in k or ".selective_modules." in k for k in state) \
            else "mmdet-dense"
    return "imagenet"


def _backbone_rename(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``backbone.*`` official names -> ours (block and gate renames as the classification converter)."""
    inner = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    out = {f"backbone.{k}": v for k, v in convert(inner, detect_format(inner)).items()}
    out.update({k: v for k, v in state.items() if not k.startswith("backbone.")})
    return out


def load_detector_checkpoint(model: MaskRCNNDetector, source: str | os.PathLike | dict, strict: bool = True) -> LoadReport:
    top, raw, desc, digest = _read(source)
    fmt = detector_format(top, raw)
    report = LoadReport(fmt, desc, digest)
    own = model.state_dict()
    if fmt == "imagenet":
        inner_fmt = detect_format(raw)
        converted = convert(raw, inner_fmt)
        state = {f"backbone.{k}": v for k, v in converted.items() if _IMAGENET_KEEP.match(k)}
        ignored = sorted(k for k in converted if not _IMAGENET_KEEP.match(k))
        unknown = [k for k in ignored if not k.startswith(_IMAGENET_IGNORED) and not k.startswith("gates.")]
        if unknown and strict:
            raise CheckpointError(_listing(f"checkpoint {desc} (ImageNet {inner_fmt} format) has keys that fit no "
                                           f"part of detector {model.name!r}", [("unexpected", unknown)]))
        if not state:
            raise CheckpointError(f"checkpoint {desc} holds no backbone weights (no patch_embed / pos_embed / blocks)")
        if ignored:
            report.notes.append(f"ImageNet checkpoint: ignored {len(ignored)} classification keys ({', '.join(ignored[:6])}"
                                + (" ..." if len(ignored) > 6 else "") + ")")
        missing_backbone = sorted(k for k in own if k.startswith("backbone.") and
                                  _IMAGENET_KEEP.match(k[len("backbone."):]) and k not in state)
        if missing_backbone and strict:
            raise CheckpointError(_listing(f"checkpoint {desc} does not fit the ViT of detector {model.name!r}",
                                           [("missing", missing_backbone)]))
        report.notes.append("ImageNet checkpoint: adapter, gates, neck and heads keep their initialisation")
        eps = 1e-5 if inner_fmt == "svit" else 1e-6
    elif fmt == "nested_svit":
        state = dict(raw)
        eps = float(top.get("block_norm_eps", model.config.vit.block_norm_eps))
    else:
        state = _backbone_rename(raw)
        eps = 1e-5 if fmt == "mmdet-svit" else 1e-6

    key = "backbone.pos_embed"
    if key in state and state[key].shape != own[key].shape and state[key].ndim == 3 \
            and state[key].shape[-1] == own[key].shape[-1]:
        side = int((own[key].shape[1] - 1) ** 0.5)
        src = state[key]
        try:
            state[key] = resize_pos_embed(src, (side, side))
        except ValueError as e:
            raise CheckpointError(f"checkpoint {desc}: {e}") from e
        report.notes.append(f"pos_embed interpolated (bicubic) from {tuple(src.shape)} to {tuple(own[key].shape)}")

    if fmt == "imagenet":
        mis_shaped = sorted(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                            for k, v in state.items() if k in own and v.shape != own[k].shape)
        if mis_shaped:  # e.g. DeiT-B weights for a DeiT-S backbone
            raise CheckpointError(_listing(f"checkpoint {desc} does not fit the ViT of detector {model.name!r}",
                                           [("mis-shaped", mis_shaped)]))
        model.load_state_dict(state, strict=False)
    else:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        gates_only = [k for k in missing if k.startswith("backbone.gates.") or k == "backbone.cls_token"]
        if fmt in ("mmdet-dense", "nested_svit") and gates_only and len(gates_only) == len(missing):
            missing = []
            if model.backbone.num_gates:
                report.notes.append(f"dense detector checkpoint: {model.backbone.num_gates} gates keep their "
                                    "initialisation")
            if "backbone.cls_token" in gates_only:
                report.notes.append("dense detector checkpoint: the class token the baseline selects with is "
                                    "randomly initialised (as the SViT authors did)")
        mis_shaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                            for k in set(own) & set(state) if state[k].shape != own[k].shape)
        if strict and (missing or unexpected or mis_shaped):
            raise CheckpointError(_listing(f"checkpoint {desc} ({fmt} format) does not fit detector {model.name!r}",
                                           [("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)]))
        model.load_state_dict({k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False)
    for block in model.backbone.blocks:
        block.set_eps(eps)
    if eps != model.config.vit.block_norm_eps:
        report.notes.append(f"block LayerNorm eps set to {eps} ({fmt} format)")
    return report


def _listing(title: str, groups: list[tuple[str, list[str]]]) -> str:
    lines = [title + ":"]
    for name, keys in groups:
        if keys:
            lines.append(f"  {name} ({len(keys)}): " + ", ".join(keys))
    return "\n".join(lines)


def save_detector_checkpoint(model: MaskRCNNDetector, path: str | os.PathLike) -> None:
    """Our layout: state dict, model name, config and the blocks' LayerNorm eps (loads with
    ``weights_only=True``; ``load_checkpoint`` and ``create_detector_from_checkpoint`` read it)."""
    payload = {"format": "nested_svit", "kind": "detector", "model_name": model.name,
               "model_config": model.config.to_dict(), "block_norm_eps": float(model.backbone.blocks[0].norm1.eps),
               "model": model.state_dict()}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


__all__ = ["load_detector_checkpoint", "save_detector_checkpoint", "detector_format", "sha256_of"]
