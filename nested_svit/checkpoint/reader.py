"""Reading checkpoint files: what a file is (a torch pickle, ``.safetensors``, or neither), its top-level
object (``weights_only``), its sha256, a memory-mapped peek at the metadata, and the state dict inside
whatever wrapper and prefix it ships in. Folders and ``hf-hub:`` names are found by ``location``."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .location import Location, LocationError, locate


class CheckpointError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model, or a file that is no checkpoint."""


@dataclass
class LoadReport:
    format: str
    source: str
    sha256: str | None = None
    notes: list[str] = field(default_factory=list)


WRAPPERS = ("model", "state_dict", "model_ema")  # DeiT/ours: "model"; timm train.py, mmcv runners: "state_dict"
# prefixes a state dict's keys carry from how it was saved: DDP (``module.``), a ``torch.compile``d model
# (``_orig_mod.``), transformers' timm wrapper (``timm_model.``); stripped in any order and combination
PREFIXES = ("module.", "_orig_mod.", "timm_model.")


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_safetensors(head: bytes) -> bool:
    """A ``.safetensors`` file: an 8-byte little-endian header length, then the JSON header (``{``)."""
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _not_a_checkpoint(head: bytes) -> str | None:
    """What a file is, from its first bytes, when it certainly is no torch.save or safetensors file."""
    if not head:
        return "an empty file"
    if is_safetensors(head):
        return None
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


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(16)


def _located(source: str | os.PathLike) -> Location:
    try:
        location = locate(source)
    except LocationError as e:
        raise CheckpointError(str(e)) from None
    if not location.weights.is_file():
        raise FileNotFoundError(f"checkpoint not found: {location.weights}")
    return location


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: not a complete .safetensors file ({e})") from None


def _load_shards(index: Path) -> dict:
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{index} is not a shard index (a JSON object with a weight_map): {e}") from None
    state: dict = {}
    for name in shards:
        obj, _, _ = read_file(index.parent / name)
        state.update(unwrap(obj, str(index.parent / name)))
    return state


def read_file(source: str | os.PathLike) -> tuple[object, str, str]:
    """Path, folder or ``hf-hub:`` name -> (loaded top-level object, description, sha256 of the weights
    file). Pickles load with ``weights_only=True``; ``.safetensors`` with ``safetensors``."""
    return _read_located(_located(source))


def _read_located(location: Location) -> tuple[object, str, str]:
    path = location.weights
    desc = str(path) if location.folder is None else f"{location.desc} ({path.name})"
    if path.name.endswith(".index.json"):  # a sharded save: every shard its index lists, merged
        return _load_shards(path), desc, sha256_of(path)
    head = _head(path)
    what = _not_a_checkpoint(head)
    if what:
        raise CheckpointError(f"{path} is {what}, not a PyTorch checkpoint (.pth / .bin) or a .safetensors file")
    if is_safetensors(head):
        return _load_safetensors(path), desc, sha256_of(path)
    try:
        obj = _load_allowing_namespace(path)
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: not a complete PyTorch checkpoint or one with "
                              f"objects other than tensors and plain data ({first})") from e
    return obj, desc, sha256_of(path)


META_KEY = "nested_svit"  # our model description inside a folder's config.json / a safetensors' metadata


def peek(source: str | os.PathLike | None) -> dict | None:
    """The top-level dict of a checkpoint, memory-mapped (tensors are not read), to look at the metadata
    it carries before building the model: a pickle's top level; for a folder (or ``hf-hub:``) or a
    ``.safetensors`` file, the description this library wrote into its ``config.json`` / metadata
    (``{}`` when there is none); None for anything else (the loader then says what is wrong with it)."""
    if not source or isinstance(source, dict):
        return None
    try:
        location = locate(source)
        if not location.weights.is_file():
            return None
        return _peek_located(location)
    except Exception:  # noqa: BLE001 - unreadable, legacy or not a checkpoint: the loader says why
        return None


def _peek_located(location: Location) -> dict | None:
    if location.folder is not None:
        return dict((location.config or {}).get(META_KEY) or {})
    if is_safetensors(_head(location.weights)):
        return _safetensors_meta(location.weights)
    obj = _load_allowing_namespace(location.weights, mmap=True)
    return obj if isinstance(obj, dict) else None


def _safetensors_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[META_KEY]) if META_KEY in meta else {}


def strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keys without the ``PREFIXES`` every key shares (``module._orig_mod.blocks.0...`` -> ``blocks.0...``)."""
    while state:
        common = next((p for p in PREFIXES if all(k.startswith(p) for k in state)), None)
        if common is None:
            return state
        state = {k[len(common):]: v for k, v in state.items()}
    return state


def unwrap(obj: object, desc: str = "<state dict>") -> dict[str, Tensor]:
    """The state dict inside a checkpoint's top-level object: ``model_ema`` when the file says its EMA
    was the best (ATC's ``ema_best``, as its ``validate_deit.py`` reads it), else the first of ``WRAPPERS`` that is a
    dict (recursively), else the object itself; its tensors, the ``PREFIXES`` all its keys share removed."""
    if isinstance(obj, dict):
        if obj.get("ema_best") is True and isinstance(obj.get("model_ema"), dict):  # ATC: its EMA scored best
            return unwrap(obj["model_ema"], desc)
        for key in WRAPPERS:
            if isinstance(obj.get(key), dict):
                return unwrap(obj[key], desc)
        tensors = strip_prefixes({k: v for k, v in obj.items() if isinstance(v, Tensor)})
        if tensors:
            return tensors
    raise CheckpointError(f"checkpoint {desc} holds no state dict of tensors (looked at the top level and at "
                          f"{', '.join(repr(k) for k in WRAPPERS)})")


@dataclass
class Checkpoint:
    """A read checkpoint: its top-level object, the state dict inside, description and sha256, and where
    it was found (its folder's ``config.json`` / ``preprocessor_config.json``; None: a state dict given in
    memory)."""

    top: dict
    state: dict[str, Tensor]
    desc: str
    sha256: str | None
    location: Location | None = None
    meta: dict = field(default_factory=dict)  # what this library wrote about the model (the top level of a
    # pickle; a folder's config.json / a safetensors file's metadata ``nested_svit`` entry)


def read(source: str | os.PathLike | dict | Checkpoint) -> Checkpoint:
    """Path, folder, ``hf-hub:`` name or in-memory checkpoint -> ``Checkpoint`` (one already read: itself)."""
    if isinstance(source, Checkpoint):
        return source
    location = None
    if isinstance(source, dict):
        top, desc, digest = source, "<state dict>", None
    else:
        location = _located(source)  # found once: read and described from the same place
        top, desc, digest = _read_located(location)
    if not isinstance(top, dict):
        raise CheckpointError(f"checkpoint {desc} is not a dict of tensors (found {type(top).__name__})")
    meta = top
    if location is not None and (location.folder is not None or is_safetensors(_head(location.weights))):
        try:
            meta = _peek_located(location) or {}
        except ValueError:  # metadata that is not ours (not JSON): the weights load, described by their shapes
            meta = {}
    return Checkpoint(top, unwrap(top, desc), desc, digest, location, meta)
