"""``save_pretrained(model, DIR)``: a classifier as the folder timm's ``local-dir:`` and the Hugging Face
Hub hold: ``model.safetensors`` + a timm-style ``config.json`` (``architecture``, ``model_args``,
``pretrained_cfg``, ``label_names``) with this library's own description of the model (its config and
pruning) under ``nested_svit``. Our loader reads it back as it was (``--checkpoint DIR``); a dense model
also loads with ``timm.create_model("local-dir:DIR", pretrained=True)``. Training checkpoints stay
``.pth`` (they hold optimizer state)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from ..io import atomic_write, atomic_write_text
from .reader import META_KEY
from .writer import FORMAT

# our dense models that timm registers under the same name; any other dense ViT is written as timm's
# generic ``vit_base_patch16_224`` entry point with every size in ``model_args``
TIMM_NAMES = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def pretrained_config(model: nn.Module) -> dict:
    """The ``config.json`` of a classifier: timm's keys, and ours under ``nested_svit``."""
    meta = dict(model.checkpoint_meta())
    if meta.get("kind") != "classifier":
        raise ValueError("save_pretrained writes classifiers; a detector's file is the .pth that "
                         "'nested-svit train' writes (save_checkpoint)")
    config = model.config
    dense = not config.gate_blocks
    model_args = {"img_size": config.img_size, "patch_size": config.patch_size, "embed_dim": config.embed_dim,
                  "depth": config.depth, "num_heads": config.num_heads, "mlp_ratio": config.mlp_ratio,
                  "num_classes": config.num_classes, "in_chans": config.in_chans, "global_pool": "token"}
    cfg = {k: _plain(v) for k, v in model.pretrained_cfg.items()}
    out = {"architecture": model.name if model.name in TIMM_NAMES else "vit_base_patch16_224",
           "num_classes": config.num_classes, "num_features": config.embed_dim, "global_pool": "token",
           "model_args": model_args, "pretrained_cfg": cfg}
    if not dense:  # timm has no gates: the architecture is ours alone
        out["architecture"] = model.name
    if meta.get("class_names"):
        out["label_names"] = list(meta["class_names"])
    out[META_KEY] = {"format": FORMAT, **{k: _plain(v) if k != "model_config" else v for k, v in meta.items()}}
    return out


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (created), each atomically;
    -> the folder. Loads back with ``load_model(DIR)`` / ``--checkpoint DIR``."""
    from safetensors.torch import save_file

    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    config = pretrained_config(model)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    state = {k: v.clone() if v.untyped_storage().nbytes() != v.numel() * v.element_size() else v
             for k, v in state.items()}  # safetensors refuses views into shared storage
    folder.mkdir(parents=True, exist_ok=True)
    # the weights file carries our description too, so it describes its model when copied out of the folder
    metadata = {"format": "pt", META_KEY: json.dumps(config[META_KEY])}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, tmp, metadata=metadata))
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    return folder


__all__ = ["save_pretrained", "pretrained_config"]
