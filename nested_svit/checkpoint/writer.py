"""The one file schema this library writes (both trainers, ``--save-calibrated``, the detector writer):

``{"format": "nested_svit", "kind": "classifier" | "detector", "model_name", "model_config" (the config
as ``dataclasses.asdict``), "model" (weights), ...extra}``; ``extra`` holds what the writer adds
(training state, class names, calibration, the blocks' LayerNorm eps). Every value is a tensor or plain
data, so files load with ``weights_only=True``. ``file_info`` reads it back, and also the files older
versions wrote (classifier files without ``format`` / ``kind``, flat model configs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..io import atomic_write
from .reader import peek

FORMAT = "nested_svit"
KINDS = ("classifier", "detector")


def checkpoint_payload(kind: str, model_name: str, model_config: dict, weights: dict[str, Tensor], **extra) -> dict:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    return {"format": FORMAT, "kind": kind, "model_name": model_name, "model_config": model_config, "model": weights,
            **extra}


def save_payload(path: str | os.PathLike, payload: dict) -> None:
    """Write atomically: a crash leaves the old file or none."""
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def write_checkpoint(path: str | os.PathLike, kind: str, model_name: str, model_config: dict,
                     weights: dict[str, Tensor], **extra) -> None:
    save_payload(path, checkpoint_payload(kind, model_name, model_config, weights, **extra))


def model_payload(model, **extra) -> dict:
    """The file of ``model`` (a classifier or a detector: whatever its ``checkpoint_meta()`` says, with
    its weights) plus ``extra`` (training state, calibration, ...)."""
    meta = dict(model.checkpoint_meta())
    kind, name, config = meta.pop("kind"), meta.pop("model_name"), meta.pop("model_config")
    return checkpoint_payload(kind, name, config, model.state_dict(), **meta, **extra)


def save_checkpoint(model, path: str | os.PathLike, **extra) -> None:
    """Write ``model`` (classifier or detector) in the one schema, atomically; it loads with
    ``load_checkpoint`` / ``--checkpoint`` and no other flag."""
    save_payload(path, model_payload(model, **extra))


@dataclass
class FileInfo:
    """What a file this library wrote says about its model (``kind`` None: not such a file)."""

    kind: str | None = None
    model_name: str | None = None
    model_config: dict | None = None
    class_names: list[str] | None = None
    extra: dict = field(default_factory=dict)


def file_info(source: str | os.PathLike | dict | None) -> FileInfo:
    """The model a checkpoint file carries (memory-mapped peek: no weights are read), or a read file's
    top-level dict."""
    top = source if isinstance(source, dict) else peek(source)
    if top is None or not isinstance(top.get("model_config"), dict):
        return FileInfo()
    kind = top.get("kind") or ("classifier" if "embed_dim" in top["model_config"] else None)
    if kind not in KINDS:
        return FileInfo()
    names = top.get("class_names")
    extra = {k: v for k, v in top.items() if k not in ("format", "kind", "model_name", "model_config", "model")}
    return FileInfo(kind, top.get("model_name"), dict(top["model_config"]), list(names) if names else None, extra)
