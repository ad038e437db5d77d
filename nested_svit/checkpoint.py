"""Load timm / DeiT / official SViT classification checkpoints into ``SparseViT``.

Formats (detected from the keys):
* ``timm``: timm ``VisionTransformer`` names (``blocks.{i}.attn.qkv.weight``, ...), plain or wrapped
  in ``{"model": ...}`` / ``{"state_dict": ...}`` (the DeiT release ships ``{"model": ...}``), with
  an optional DDP ``module.`` prefix. Block LayerNorm eps 1e-6.
* ``svit``: the official SViT release: ``blocks.{i}.TransformerEncoderLayer.{self_attn.in_proj_*,
  self_attn.out_proj.*, linear1.*, linear2.*, norm1.*, norm2.*}``, gates in
  ``selective_modules.{k}.{norm,mlp.fc1,mlp.fc2}``. Its blocks are ``nn.TransformerEncoderLayer``
  with LayerNorm eps 1e-5, carried into the model so converted numbers match the source.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .layers import resize_pos_embed
from .model import SparseViT

_SVIT_BLOCK_KEYS = {
    "self_attn.in_proj_weight": "attn.qkv.weight",
    "self_attn.in_proj_bias": "attn.qkv.bias",
    "self_attn.out_proj.weight": "attn.proj.weight",
    "self_attn.out_proj.bias": "attn.proj.bias",
    "linear1.weight": "mlp.fc1.weight",
    "linear1.bias": "mlp.fc1.bias",
    "linear2.weight": "mlp.fc2.weight",
    "linear2.bias": "mlp.fc2.bias",
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
}
_BLOCK_EPS = {"timm": 1e-6, "svit": 1e-5}


class CheckpointError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model."""


@dataclass
class LoadReport:
    format: str
    source: str
    sha256: str | None = None
    notes: list[str] = field(default_factory=list)


def _unwrap(obj: object) -> dict[str, Tensor]:
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_ema"):
            if key in obj and isinstance(obj[key], dict):
                return _unwrap(obj[key])
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    raise CheckpointError("checkpoint holds no state dict of tensors (looked at the top level and at "
                          "'model', 'state_dict', 'model_ema')")


def detect_format(state: dict[str, Tensor]) -> str:
    if any(".TransformerEncoderLayer." in k or k.startswith("selective_modules.") for k in state):
        return "svit"
    return "timm"


def convert(state: dict[str, Tensor], fmt: str) -> dict[str, Tensor]:
    """Rename keys of ``fmt`` to this library's (timm) names."""
    if fmt == "timm":
        return dict(state)
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.TransformerEncoderLayer\.(.+)", key)
        if m and m.group(2) in _SVIT_BLOCK_KEYS:
            out[f"blocks.{m.group(1)}.{_SVIT_BLOCK_KEYS[m.group(2)]}"] = value
            continue
        m = re.fullmatch(r"selective_modules\.(\d+)\.(.+)", key)
        out[f"gates.{m.group(1)}.{m.group(2)}" if m else key] = value
    return out


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint_file(source: str | os.PathLike) -> tuple[object, str, str]:
    """Path -> (loaded object, description, sha256). Loads with ``weights_only=True``."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    return obj, str(path), sha256_of(path)


def read_state_dict(source: str | os.PathLike | dict) -> tuple[dict[str, Tensor], str, str | None]:
    """Path or in-memory checkpoint -> (state dict, description, sha256 of the file)."""
    if isinstance(source, dict):
        return _unwrap(source), "<state dict>", None
    obj, desc, digest = read_checkpoint_file(source)
    return _unwrap(obj), desc, digest


def load_checkpoint(model: SparseViT, source: str | os.PathLike | dict, strict: bool = True) -> LoadReport:
    """Load ``source`` (path or state dict) into ``model`` in place (a classifier, or a detector:
    see ``detection/checkpoint.py``).

    Gates missing from a dense (timm/DeiT) checkpoint keep their initialisation (fine-tuning starts
    there) and are noted; every other missing, unexpected or mis-shaped key is an error listing all
    of them. A ``pos_embed`` of another grid size is interpolated (bicubic) and noted.
    """
    if not isinstance(model, SparseViT):
        from .detection.checkpoint import load_detector_checkpoint
        from .detection.detector import MaskRCNNDetector

        if isinstance(model, MaskRCNNDetector):
            return load_detector_checkpoint(model, source, strict)
        raise TypeError(f"cannot load a checkpoint into {type(model).__name__}")
    raw, desc, digest = read_state_dict(source)
    fmt = detect_format(raw)
    state = convert(raw, fmt)
    report = LoadReport(fmt, desc, digest)
    own = model.state_dict()

    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        src, dst = state["pos_embed"], own["pos_embed"]
        if src.ndim == 3 and src.shape[-1] == dst.shape[-1]:
            side = math.isqrt(dst.shape[1] - 1)
            state["pos_embed"] = resize_pos_embed(src, (side, side))
            report.notes.append(f"pos_embed interpolated (bicubic) from {tuple(src.shape)} to {tuple(dst.shape)}")

    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
    gate_missing = [k for k in missing if k.startswith("gates.")]
    if fmt == "timm" and gate_missing and len(gate_missing) == sum(k.startswith("gates.") for k in own):
        missing = [k for k in missing if not k.startswith("gates.")]
        report.notes.append(f"dense checkpoint: {model.num_gates} gates keep their initialisation")
    if strict and (missing or unexpected or mis_shaped):
        lines = [f"checkpoint {desc} ({fmt} format) does not fit model {model.name!r}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise CheckpointError("\n".join(lines))

    model.load_state_dict({k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False)
    for block in model.blocks:
        block.set_eps(_BLOCK_EPS[fmt])
    if _BLOCK_EPS[fmt] != model.config.block_norm_eps:
        report.notes.append(f"block LayerNorm eps set to {_BLOCK_EPS[fmt]} ({fmt} format)")
    return report
