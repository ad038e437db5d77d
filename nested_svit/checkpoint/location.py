"""Where a checkpoint's weights and configs are: a file, a folder (``config.json`` beside the weights, as
timm's ``local-dir:`` and ``transformers``' ``save_pretrained`` write them), ``local-dir:PATH``, or
``hf-hub:ORG/NAME[@REV]`` resolved **offline** from the Hugging Face cache (``HF_HUB_CACHE``,
``HF_HOME``, the default location) through ``huggingface_hub``'s own cache API; never the network."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# the weights a folder may hold, in timm's order of preference (timm ``_hub.load_state_dict_from_hf``)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "open_clip_model.safetensors", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "open_clip_pytorch_model.bin", "model.pth", "checkpoint.pth", "model.pt")
HUB_PREFIX, LOCAL_PREFIX = "hf-hub:", "local-dir:"


class LocationError(ValueError):
    """A source that names no readable checkpoint (a folder without weights, a name not in the cache)."""


@dataclass(frozen=True)
class Location:
    """``weights``: the file that holds the tensors; ``config``: the ``config.json`` beside them (timm's or
    transformers'), ``preprocessor``: ``preprocessor_config.json`` (transformers), ``folder``: where they
    were found (None for a bare file); ``desc``: the source as the user gave it."""

    weights: Path
    desc: str
    folder: Path | None = None
    config: dict | None = None
    preprocessor: dict | None = None

    @property
    def config_source(self) -> str | None:
        """Where ``config`` came from, for provenance (``hf-hub:org/name config.json``)."""
        return f"{self.desc} config.json" if self.config is not None else None


def is_folder_source(source: object) -> bool:
    """A source whose weights come with a ``config.json`` (a folder, ``local-dir:``, ``hf-hub:``)."""
    if source is None or isinstance(source, dict):
        return False
    text = str(source)
    return text.startswith((HUB_PREFIX, LOCAL_PREFIX)) or Path(text).is_dir()


def locate(source: str | os.PathLike) -> Location:
    """The weights file (and configs) a source names; a bare file is returned as it is (existence is the
    reader's to check)."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        return _in_folder(hub_snapshot(text[len(HUB_PREFIX):]), text)
    if text.startswith(LOCAL_PREFIX):
        folder = Path(text[len(LOCAL_PREFIX):]).expanduser()
        if not folder.is_dir():
            raise LocationError(f"{text}: {folder} is not a folder")
        return _in_folder(folder, text)
    path = Path(text)
    return _in_folder(path, text) if path.is_dir() else Location(path, text)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LocationError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise LocationError(f"{path} holds {type(value).__name__}, not a JSON object")
    return value


def _in_folder(folder: Path, desc: str) -> Location:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return Location(folder / name, desc, folder, _read_json(folder / "config.json"),
                            _read_json(folder / "preprocessor_config.json"))
    shown = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
    raise LocationError(f"{desc}: the folder holds no weights file ({' / '.join(WEIGHT_FILES[:3])} ...); it holds "
                        f"{shown}")


def hub_cache() -> str:
    """The Hugging Face cache folder, read from the environment now (as ``huggingface_hub.constants``
    reads it at import): ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.expanduser(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")), "hub")


def hub_snapshot(name: str) -> Path:
    """``ORG/NAME[@REV]`` -> its snapshot folder in the local Hugging Face cache, read with
    ``huggingface_hub.snapshot_download(local_files_only=True)`` (never the network)."""
    from huggingface_hub import snapshot_download

    repo, _, revision = name.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise LocationError(f"hf-hub:{name}: give the repository as hf-hub:ORG/NAME[@REVISION]")
    where = hub_cache()
    try:
        return Path(snapshot_download(repo, revision=revision or None, cache_dir=where, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - LocalEntryNotFoundError and its relatives
        raise LocationError(f"hf-hub:{name} is not in the Hugging Face cache (looked in {where}, set by HF_HUB_CACHE / "
                            f"HF_HOME; nothing is downloaded here). On a machine with a network: "
                            f"hf download {repo}{' --revision ' + revision if revision else ''} "
                            f"(then copy {where}), or give the folder or file instead ({type(e).__name__})") from None
