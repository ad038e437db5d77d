"""Load timm / DeiT / official SViT classification checkpoints into ``SparseViT``.

Formats (detected from the keys):
* ``timm``: timm ``VisionTransformer`` names (``blocks.{i}.attn.qkv.weight``, ...), plain or wrapped
  in ``{"model": ...}`` / ``{"state_dict": ...}`` (the DeiT release ships ``{"model": ...}``), with
  an optional DDP ``module.`` prefix. Block LayerNorm eps 1e-6.
* ``svit``: the official SViT release: ``blocks.{i}.TransformerEncoderLayer.{self_attn.in_proj_*,
  self_attn.out_proj.*, linear1.*, linear2.*, norm1.*, norm2.*}``, gates in
  ``selective_modules.{k}.{norm,mlp.fc1,mlp.fc2}``. Its blocks are ``nn.TransformerEncoderLayer``
  with LayerNorm eps 1e-5, carried into the model so converted numbers match the source.
* ``dynamicvit``: DynamicViT's release (timm keys + ``score_predictor.{s}.*`` -> ``gates.{s}.*``).
* ``evovit``: Evo-ViT's release: ``qks.{i}.qk`` + ``vs.{i}.v`` -> ``blocks.{i}.attn.qkv`` (rows q, k | v),
  ``norms.{i}`` -> ``norm1``, ``projs.{i}`` -> ``attn.proj``; its distillation head ``head_cls`` /
  ``norm_cls`` is not used at inference and is left out (noted).
EViT, ToMe and ATS files are DeiT (timm) layouts; ATS's constant ``attn.out_zero_mask`` is left out.
EViT and Evo-ViT files also hold their training ``args`` (an ``argparse.Namespace``, which
``weights_only=True`` refuses): read by allowing that one class and nothing else.
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
_BLOCK_EPS = {"timm": 1e-6, "svit": 1e-5, "dynamicvit": 1e-6, "evovit": 1e-6}
_DROPPED = (re.compile(r"blocks\.\d+\.attn\.out_zero_mask"), re.compile(r"(head_cls|norm_cls)\..+"))


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
    if any(k.startswith("score_predictor.") for k in state):
        return "dynamicvit"
    if any(k.startswith("qks.") for k in state):
        return "evovit"
    return "timm"


def _convert_evovit(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"(qks|vs|norms|projs)\.(\d+)\.(?:qk\.|v\.)?(weight|bias)", key)
        if not m:
            out[key] = value
            continue
        kind, i, what = m.groups()
        if kind == "norms":
            out[f"blocks.{i}.norm1.{what}"] = value
        elif kind == "projs":
            out[f"blocks.{i}.attn.proj.{what}"] = value
        elif kind == "qks":
            out[f"blocks.{i}.attn.qkv.{what}"] = torch.cat([value, state[f"vs.{i}.v.{what}"]], 0)
    return out


def convert(state: dict[str, Tensor], fmt: str) -> dict[str, Tensor]:
    """Rename keys of ``fmt`` to this library's (timm) names."""
    if fmt == "timm":
        return dict(state)
    if fmt == "dynamicvit":
        return {re.sub(r"^score_predictor\.", "gates.", k): v for k, v in state.items()}
    if fmt == "evovit":
        return _convert_evovit(state)
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
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the .pth file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    what = _not_a_checkpoint(head)
    if what:
        raise CheckpointError(f"{path} is {what}, not a PyTorch checkpoint (.pth)")
    try:
        obj = _load_allowing_namespace(path)
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: not a complete PyTorch checkpoint or one with "
                              f"objects other than tensors and plain data ({first})") from e
    return obj, str(path), sha256_of(path)


def _load_allowing_namespace(path: Path) -> object:
    """``torch.load(weights_only=True)``; a file refused only for an ``argparse.Namespace`` (the
    training ``args`` EViT / Evo-ViT / DeiT-style files carry) is read again with that one class
    allowed: still no arbitrary code."""
    import argparse

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        if "argparse.Namespace" not in str(e):
            raise
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _not_a_checkpoint(head: bytes) -> str | None:
    """What a file is, from its first bytes, when it certainly is no torch.save file."""
    if not head:
        return "an empty file"
    for magic, name in ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
                        (b"PAR1", "a Parquet file"), (b"%PDF", "a PDF document")):
        if head.startswith(magic):
            return name
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return None  # zip (torch >= 1.6) or legacy pickle
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return None


def read_state_dict(source: str | os.PathLike | dict) -> tuple[dict[str, Tensor], str, str | None]:
    """Path or in-memory checkpoint -> (state dict, description, sha256 of the file)."""
    if isinstance(source, dict):
        return _unwrap(source), "<state dict>", None
    obj, desc, digest = read_checkpoint_file(source)
    return _unwrap(obj), desc, digest


def peek_checkpoint(source: str | os.PathLike | None) -> dict | None:
    """The top-level dict of a checkpoint file, memory-mapped (tensors are not read), to look at the
    metadata our files carry before building the model; None for anything else (``load_checkpoint``
    then reports what is wrong with it)."""
    if not source or not Path(source).is_file():
        return None
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable, legacy or not a checkpoint: the loader says why
        return None
    return obj if isinstance(obj, dict) else None


def checkpoint_model_config(source: str | os.PathLike | None) -> tuple[str | None, dict | None, list[str] | None]:
    """(model name, ``ViTConfig`` fields, class names) that a file written by ``nested-svit train``
    carries, else Nones."""
    obj = peek_checkpoint(source)
    if obj is not None and isinstance(obj.get("model_config"), dict) and obj.get("kind") != "detector":
        names = obj.get("class_names")
        return obj.get("model_name"), dict(obj["model_config"]), list(names) if names else None
    return None, None, None


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
    dropped = sorted(k for k in state if k not in model.state_dict() and any(p.fullmatch(k) for p in _DROPPED))
    if dropped:
        for k in dropped:
            del state[k]
        report.notes.append(f"left out {len(dropped)} keys not used at inference ({dropped[0]}, ...)")
    own = model.state_dict()

    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        src, dst = state["pos_embed"], own["pos_embed"]
        if src.ndim == 3 and src.shape[-1] == dst.shape[-1]:
            side = math.isqrt(dst.shape[1] - 1)
            try:
                state["pos_embed"] = resize_pos_embed(src, (side, side))
            except ValueError as e:  # deit3 / distilled layouts: extra tokens or non-square grids
                raise CheckpointError(f"checkpoint {desc}: pos_embed {tuple(src.shape)} cannot be resized to "
                                      f"{tuple(dst.shape)}: {e}") from e
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
                shown = ", ".join(keys[:40]) + (f" ... and {len(keys) - 40} more" if len(keys) > 40 else "")
                lines.append(f"  {title} ({len(keys)}): {shown}")
        raise CheckpointError("\n".join(lines))

    model.load_state_dict({k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False)
    for block in model.blocks:
        block.set_eps(_BLOCK_EPS[fmt])
    if _BLOCK_EPS[fmt] != model.config.block_norm_eps:
        report.notes.append(f"block LayerNorm eps set to {_BLOCK_EPS[fmt]} ({fmt} format)")
    return report
