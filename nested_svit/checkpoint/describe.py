"""What model a checkpoint describes, read from the file alone: the architecture (a registered name, or a
ViT built from the file's shapes and its config's heads), its head size and input size, its eval
preprocessing and label names (timm's ``pretrained_cfg`` / ``label_names``, transformers'
``preprocessor_config.json`` / ``id2label``), and which of those the file gave. Variants the engine does
not run (distilled DeiT, DeiT-III's position table, register tokens, class-token-free ViTs) are refused by
name. Files this library wrote and baselines' release files are described by ``writer.file_info`` and
``release.release_pruning``; this module covers every other layout."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from torch import Tensor

from ..config import ViTConfig
from ..registry import HEADS_BY_WIDTH, eval_config, get_config, list_models
from .convert import BLOCK_EPS, convert, detect_format
from .keys import state_shape
from .reader import Checkpoint, CheckpointError

# PIL's resample numbers, as transformers' image processors store them
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass
class Described:
    """``name``: the model's name (a registry name, or the file's architecture); ``config``: the
    architecture to build; ``pretrained_cfg``: the eval preprocessing (timm's keys, ``input_size``
    included); ``given``: which of its fields the file gave, and where from (``{"mean": "hf-hub:... config.json"}``);
    ``class_names``: the file's label names; ``how``: one line on what the file was read as."""

    name: str
    config: ViTConfig
    pretrained_cfg: dict
    given: dict[str, str] = field(default_factory=dict)
    class_names: list[str] | None = None
    how: str = ""


def refuse_variants(state: dict[str, Tensor], desc: str) -> None:
    """Layouts the engine does not run, refused by their name (a timm-named, converted state dict)."""
    if "dist_token" in state or "head_dist.weight" in state:
        raise CheckpointError(f"{desc} is a distilled DeiT (a distillation token and head_dist): nested_svit runs "
                              "class-token ViTs; use the non-distilled DeiT weights (deit_*_patch16_224)")
    if "reg_token" in state:
        raise CheckpointError(f"{desc} is a ViT with register tokens (reg_token): not supported; use a class-token ViT")
    table = state.get("pos_embed")
    if table is not None and table.ndim == 3:
        rows = int(table.shape[1])
        square = math.isqrt(rows) ** 2 == rows
        if "cls_token" in state and square:
            raise CheckpointError(f"{desc} has a class token outside its position table ({rows} rows, a square grid: "
                                  "timm's no_embed_class layout, as DeiT-III and some augreg ViTs): not supported")
        if "cls_token" not in state and square:
            raise CheckpointError(f"{desc} is a ViT without a class token (global average pooling, {rows} patch "
                                  "rows): not supported; use a class-token ViT")


def vit_config(shape: dict, heads: int | None, desc: str, **extra) -> ViTConfig:
    """A dense ViT of ``shape`` (``keys.state_shape``) at the input size its position table was trained
    at; ``heads`` from the file's config, else by width (``registry.HEADS_BY_WIDTH``)."""
    width, patch, tokens = shape["embed_dim"], shape["patch_size"], shape["tokens"]
    if not (width and patch and tokens and shape["depth"]):
        raise CheckpointError(f"{desc} holds no complete ViT (patch embedding, position table and blocks)")
    heads = heads or HEADS_BY_WIDTH.get(width)
    if heads is None:
        raise CheckpointError(f"{desc}: a ViT of width {width} whose attention heads the file does not say; give "
                              "--model (or name=) of that shape")
    side = math.isqrt(tokens - 1)
    mlp = shape.get("mlp_hidden")
    return ViTConfig(embed_dim=width, num_heads=heads, depth=shape["depth"], patch_size=patch, img_size=side * patch,
                     num_classes=shape["num_classes"] or 0, **({"mlp_ratio": mlp / width} if mlp else {}), **extra)


def timm_preprocessing(cfg: dict | None) -> dict:
    """The eval keys of a timm ``pretrained_cfg`` (``input_size``, ``crop_pct``, ``crop_mode``,
    ``interpolation``, ``mean``, ``std``), those it has."""
    keys = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")
    out = {k: cfg[k] for k in keys if isinstance(cfg, dict) and cfg.get(k) is not None}
    for k in ("input_size", "mean", "std"):
        if k in out:
            out[k] = tuple(out[k])
    return out


def transformers_preprocessing(proc: dict | None) -> dict:
    """A transformers image processor's config as timm's ``pretrained_cfg`` keys: a ``size`` of height x
    width resizes both sides (timm's ``squash``), then ``crop_size`` is center-cropped (DeiT: 256 -> 224);
    ``shortest_edge`` resizes the short side (timm's ``center``)."""
    if not isinstance(proc, dict):
        return {}
    out: dict = {}
    size, crop = proc.get("size") or {}, proc.get("crop_size") or {}
    side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
    cropped = (crop.get("height") if isinstance(crop, dict) else crop) if proc.get("do_center_crop") else None
    if side:
        final = cropped or side
        crop_pct = final / side
        while math.floor(final / crop_pct) < side:  # resize_to = floor(final / crop_pct) must be the processor's size
            crop_pct = math.nextafter(crop_pct, 0.0)
        out.update(input_size=(3, final, final), crop_pct=crop_pct,
                   crop_mode="center" if isinstance(size, dict) and "shortest_edge" in size else "squash")
    if proc.get("resample") in _RESAMPLE:
        out["interpolation"] = _RESAMPLE[proc["resample"]]
    if proc.get("do_normalize", True):
        for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
            if proc.get(theirs) is not None:
                out[ours] = tuple(proc[theirs])
    return out


def _labels(names: object) -> list[str] | None:
    """timm's ``label_names`` list, or transformers' ``id2label`` when it is more than ``LABEL_<i>``."""
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return list(names)
    if isinstance(names, dict) and names:
        values = [str(names.get(str(i), names.get(i, ""))) for i in range(len(names))]
        return None if all(v == f"LABEL_{i}" for i, v in enumerate(values)) else values
    return None


def _arch_fits(arch: str, shape: dict) -> bool:
    """Whether a timm name's width and patch (``vit_small_patch32_224``) are the file's: a folder may
    name timm's generic entry point with every size in ``model_args`` (``save_pretrained`` of a ViT timm
    does not register), which then does not describe the weights."""
    m = re.search(r"_(tiny|small|base|large|huge)_patch(\d+)", arch)
    widths = {"tiny": 192, "small": 384, "base": 768, "large": 1024, "huge": 1280}
    return m is None or (widths[m.group(1)], int(m.group(2))) == (shape["embed_dim"], shape["patch_size"])


def _registered(arch: str | None, shape: dict) -> str | None:
    """``arch`` (a timm name, its ``.tag`` left out) when it is registered here with ``shape``'s width,
    patch and depth."""
    base = (arch or "").split(".")[0]
    if base not in list_models():
        return None
    cfg = get_config(base)
    same = (cfg.embed_dim, cfg.patch_size, cfg.depth) == (shape["embed_dim"], shape["patch_size"], shape["depth"])
    return base if same and bool(cfg.gate_blocks) == bool(shape["gates"]) else None


def _source_name(location) -> str | None:
    """A model's name from where it was found: ``ORG/NAME`` of an ``hf-hub:`` name, else its folder's name."""
    if location is None or location.folder is None:
        return None
    text = location.desc
    return text.split(":", 1)[1].split("@")[0] if text.startswith("hf-hub:") else location.folder.name


def _registered_config(name: str, shape: dict, **extra) -> ViTConfig:
    """Registered ``name`` with the file's head size and the input size its position table was trained at."""
    base = get_config(name)
    side = math.isqrt((shape["tokens"] or base.num_tokens) - 1)
    size = side * base.patch_size if side * side == (shape["tokens"] or base.num_tokens) - 1 else base.img_size
    return get_config(name, num_classes=shape["num_classes"] if shape["num_classes"] is not None else base.num_classes,
                      img_size=size, **extra)


def describe(ckpt: Checkpoint, like: list[str], name: str | None = None) -> Described:
    """The model a (timm, transformers or bare state dict) checkpoint describes. ``like``: registered
    models of its shape (``loader.models_like``), used when the file names no architecture; ``name``: the
    model the user named, given the file's head size, input size and preprocessing."""
    fmt = detect_format(ckpt.state)
    state = convert(ckpt.state, fmt)
    refuse_variants(state, ckpt.desc)
    shape = state_shape(state)
    location = ckpt.location
    config = (location.config if location else None) or {}
    if config.get("model_type") in ("vit", "deit") or fmt == "transformers":
        arch = (config.get("architectures") or [f"{config.get('model_type', 'vit')} (transformers)"])[0]
        heads = config.get("num_attention_heads")
        eps = float(config.get("layer_norm_eps", BLOCK_EPS["transformers"]))
        built = _registered_config(name, shape, block_norm_eps=eps, norm_eps=eps) if name else \
            vit_config(shape, heads, ckpt.desc, block_norm_eps=eps, norm_eps=eps)
        pre = transformers_preprocessing(location.preprocessor if location else None)
        pre_source = f"{location.desc} preprocessor_config.json" if pre else None
        names = _labels(config.get("id2label"))
        how = f"a transformers {arch} ({heads or built.num_heads} heads, LayerNorm eps {eps:g})"
        name = name or config.get("_name_or_path") or _source_name(location) or arch
    else:
        arch = config.get("architecture") or ckpt.top.get("arch")
        arch = arch if isinstance(arch, str) else None
        pre, pre_source = timm_preprocessing(config.get("pretrained_cfg")), location and location.config_source
        names = _labels(config.get("label_names"))
        arch = arch if arch and _arch_fits(arch, shape) else None
        registered = name or _registered(arch, shape) or (None if arch else next(iter(like), None))
        if registered:
            built = _registered_config(registered, shape)
        else:
            built = vit_config(shape, (config.get("model_args") or {}).get("num_heads"), ckpt.desc)
        how = (f"timm's {arch} ({'its config.json' if config else 'a timm train.py file'})" if arch
               else f"a {fmt}-layout state dict of {registered or 'no registered model'}'s shape")
        name = registered or (arch or "").split(".")[0] or \
            f"vit_{shape['embed_dim']}_patch{shape['patch_size']}_{built.img_size}"
    cfg = {**eval_config(name if name in list_models() else None), **pre,
           "input_size": (3, built.img_size, built.img_size)}
    given = {k: pre_source or ckpt.desc for k in pre if k != "input_size"}
    return Described(name, built, cfg, given, names if names and len(names) == built.num_classes else None, how)
