"""Reading checkpoint files: what a file is, its top-level object (``weights_only``), its sha256, a
memory-mapped peek at the metadata, and the state dict inside whatever wrapper it ships in."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model, or a file that is no checkpoint."""


@dataclass
class LoadReport:
    format: str
    source: str
    sha256: str | None = None
    notes: list[str] = field(default_factory=list)


WRAPPERS = ("model", "state_dict", "model_ema")  # DeiT/timm/ours: "model"; mmcv runners: "state_dict"


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


class ReleaseArgs:
    """The training ``args`` (an ``argparse.Namespace``) a release file carries, read back as a plain
    object of its attributes (``vars(args)``): no class of the writer's is ever imported."""

    def __repr__(self) -> str:
        return f"ReleaseArgs({vars(self)})"


def _load_allowing_namespace(path: Path, mmap: bool = False) -> object:
    """``torch.load(weights_only=True)``; a file refused only for an ``argparse.Namespace`` (the
    training ``args`` EViT / Evo-ViT / DeiT-style files carry) is read again with that one name read as
    ``ReleaseArgs``: still no arbitrary code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001
        if "argparse.Namespace" not in str(e):
            raise
    with torch.serialization.safe_globals([(ReleaseArgs, "argparse.Namespace")]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def read_file(source: str | os.PathLike) -> tuple[object, str, str]:
    """Path -> (loaded top-level object, description, sha256). Loads with ``weights_only=True``."""
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


def peek(source: str | os.PathLike | None) -> dict | None:
    """The top-level dict of a checkpoint file, memory-mapped (tensors are not read), to look at the
    metadata a file carries before building the model; None for anything else (the loader then says
    what is wrong with it)."""
    if not source or not Path(source).is_file():
        return None
    try:
        obj = _load_allowing_namespace(Path(source), mmap=True)
    except Exception:  # noqa: BLE001 - unreadable, legacy or not a checkpoint: the loader says why
        return None
    return obj if isinstance(obj, dict) else None


def unwrap(obj: object, desc: str = "<state dict>") -> dict[str, Tensor]:
    """The state dict inside a checkpoint's top-level object: the first of ``WRAPPERS`` that is a
    dict (recursively), else the object itself; its tensors, a DDP ``module.`` prefix removed."""
    if isinstance(obj, dict):
        for key in WRAPPERS:
            if isinstance(obj.get(key), dict):
                return unwrap(obj[key], desc)
        tensors = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()
                   if isinstance(v, Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"checkpoint {desc} holds no state dict of tensors (looked at the top level and at "
                          f"{', '.join(repr(k) for k in WRAPPERS)})")


@dataclass
class Checkpoint:
    """A read checkpoint: its top-level object, the state dict inside, description and sha256."""

    top: dict
    state: dict[str, Tensor]
    desc: str
    sha256: str | None


def read(source: str | os.PathLike | dict) -> Checkpoint:
    """Path or in-memory checkpoint -> ``Checkpoint``."""
    if isinstance(source, dict):
        top, desc, digest = source, "<state dict>", None
    else:
        top, desc, digest = read_file(source)
    if not isinstance(top, dict):
        raise CheckpointError(f"checkpoint {desc} is not a dict of tensors (found {type(top).__name__})")
    return Checkpoint(top, unwrap(top, desc), desc, digest)
