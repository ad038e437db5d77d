"""``load_checkpoint(model, source)``: one entry point, dispatched on the model's type. Classifiers
(``SparseViT``) are registered here; the detector registers its own loader
(``detection/checkpoint.py``), as detectron2's ``DetectionCheckpointer`` sits above a generic one."""
from __future__ import annotations

import dataclasses
import os
from functools import singledispatch

from torch import nn

from ..config import ViTConfig
from ..data.transforms import SETTINGS as TRANSFORM_SETTINGS
from ..model import SparseViT
from ..registry import eval_config, get_config, list_models, model_for
from .convert import BLOCK_EPS, convert, detect_format
from .describe import refuse_variants
from .keys import calibration_notes, check_keys, describe_shape, drop_unused, fit_pos_embed, state_shape
from .reader import Checkpoint, CheckpointError, LoadReport, read
from .release import release_pruning, same_pruning
from .writer import file_info


@singledispatch
def load_checkpoint(model: nn.Module, source: str | os.PathLike | dict | Checkpoint, strict: bool = True) -> LoadReport:
    """Load ``source`` (a file, a folder, ``hf-hub:ORG/NAME`` from the local cache, a state dict, or a
    ``Checkpoint`` already read) into ``model`` in place; -> what was read and noted."""
    raise TypeError(f"cannot load a checkpoint into {type(model).__name__}")


@load_checkpoint.register
def _load_classifier(model: SparseViT, source: str | os.PathLike | dict | Checkpoint, strict: bool = True) -> LoadReport:
    """Classifier weights from any layout of ``convert.py``. Selector parameters missing from a dense
    (timm/DeiT) checkpoint keep their initialisation (fine-tuning starts there) and are noted; every
    other missing, unexpected or mis-shaped key is an error listing all of them. A ``pos_embed`` of
    another grid size is interpolated (bicubic) and noted. Block LayerNorm eps follows the layout."""
    ckpt = read(source)
    fmt = detect_format(ckpt.state)
    if fmt.startswith("mmdet"):
        raise CheckpointError(f"{ckpt.desc} is a detector checkpoint; load it into a detector "
                              f"(nested_svit.create_detector), not the classifier {model.name!r}")
    check_release(model, ckpt.top, ckpt.desc)
    state = convert(ckpt.state, fmt)
    refuse_variants(state, ckpt.desc)
    # the key layout is timm's for files of ours too; the report names what the file is
    report = LoadReport("nested_svit" if file_info(ckpt.meta).kind == "classifier" else fmt, ckpt.desc, ckpt.sha256,
                        notes=calibration_notes(ckpt.meta))
    own = model.state_dict()
    drop_unused(state, own, report)
    fit_pos_embed(state, own, "pos_embed", report)
    selectors = {k for k in own if k.startswith("gates.")}
    ignore: set[str] = set()
    if fmt == "timm" and selectors and not selectors & set(state):
        ignore = selectors
        report.notes.append(f"dense checkpoint: {model.num_gates} gates keep their initialisation "
                            f"({model.method.title} selectors)")
    if strict:
        try:
            check_keys(f"checkpoint {ckpt.desc} ({fmt} format) does not fit model {model.name!r}", own, state, ignore)
        except CheckpointError as e:
            listing = str(e).split("\n", 1)[-1]
            raise CheckpointError(f"checkpoint {ckpt.desc} holds {looks_like(state)}, which does not fit model "
                                  f"{model.name!r} ({fmt} format):\n{listing}") from None
    model.load_state_dict({k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False)
    hf_config = (ckpt.location.config if ckpt.location else None) or {}
    eps = float(ckpt.meta.get("block_norm_eps", hf_config.get("layer_norm_eps", BLOCK_EPS[fmt])))
    for block in model.blocks:
        block.set_eps(eps)
    if eps != model.config.block_norm_eps:
        report.notes.append(f"block LayerNorm eps set to {eps} ({fmt} format)")
    if fmt == "transformers" and model.norm.eps != eps:  # transformers' final LayerNorm has the blocks' eps
        model.norm.eps = eps
        report.notes.append(f"final LayerNorm eps set to {eps} (transformers layout)")
    return report


def looks_like(state: dict) -> str:
    """What a converted classification state dict holds, and the registered models of that shape (with
    gates if it has selector weights, dense if not): ``a ViT with embed dim 64, ... (like svit_digits)``."""
    shape = state_shape(state)
    like = _registered_like(shape)
    return describe_shape(shape) + (f" (like {' or '.join(like[:4])})" if like else " (no registered model has that shape)")


def models_like(source: str | os.PathLike | Checkpoint) -> list[str]:
    """Registered classifiers whose shape a plain (timm-layout or a release's) checkpoint has, those
    with gates first when it carries selector weights; of the same input size first, then of any (a
    384-px fine-tune of a registered model runs at its own size)."""
    ckpt = read(source)
    fmt = detect_format(ckpt.state)
    if fmt.startswith("mmdet"):
        return []
    shape = state_shape(convert(ckpt.state, fmt))
    return _registered_like(shape) or _registered_like({**shape, "tokens": None})


def _registered_like(shape: dict) -> list[str]:
    """Registered classifiers of ``shape``'s ViT (embed dim, patch, depth, tokens), those with gates
    first when it has selector weights (dense ones first when not)."""
    def same_vit(cfg: ViTConfig) -> bool:
        return all(shape[k] in (None, v) for k, v in (("embed_dim", cfg.embed_dim), ("patch_size", cfg.patch_size),
                                                      ("depth", cfg.depth), ("tokens", cfg.num_tokens)))

    same = [name for name in list_models() if same_vit(get_config(name))]
    return sorted(same, key=lambda n: bool(get_config(n).gate_blocks) != bool(shape["gates"]))


def check_release(model: SparseViT, top: dict, desc: str) -> None:
    """A baseline's release file whose training ``args`` disagree with ``model``'s method settings (EViT
    at another keep rate, without the fused token, ...) is refused, naming the model that fits."""
    found = release_pruning(top)
    if found is None:
        return
    pruning, what = found
    if pruning.method != model.config.pruning.method or same_pruning(pruning, model.config.pruning, model.options):
        return
    name, overrides = model_for(pruning, model.config.embed_dim)
    fix = ", ".join([repr(name)] + [f"{k}={v!r}" for k, v in overrides.items()]) if name else None
    raise CheckpointError(f"{desc} is {what} (its training args), but model {model.name!r} is configured otherwise: "
                          + (f"use create_model({fix})" if fix else "configure the model as the file says")
                          + " (nested-svit: give --checkpoint without --model and it configures itself from the file)")


def release_model(source: str | os.PathLike | None) -> tuple[str, dict, str] | None:
    """For a baseline's release file that carries its training args: (the named model of its method and
    width, the overrides that configure it as the file says, a description), else None."""
    from .reader import peek, unwrap

    top = peek(source)
    found = release_pruning(top)
    if found is None:
        return None
    try:
        state = unwrap(top)
    except CheckpointError:
        return None
    table = state.get("pos_embed", state.get("cls_token"))
    if table is None:
        return None
    name, overrides = model_for(found[0], int(table.shape[-1]))
    return (name, overrides, found[1]) if name else None


def classifier_from_file(source: str | os.PathLike | None, **overrides) -> SparseViT | None:
    """The classifier a file written by this library carries (``model_config`` with ``overrides``,
    e.g. ``img_size``), named as in the file and with its class names when they fit, random weights
    (load them with ``load_checkpoint``); None for any other file."""
    info = file_info(source)
    if info.kind != "classifier":
        return None
    model = SparseViT(dataclasses.replace(ViTConfig.from_dict(info.model_config), **overrides))
    model.name = info.model_name or "custom"
    carried = info.extra.get("pretrained_cfg")
    model.pretrained_cfg = {**eval_config(info.model_name), **(carried or {})}
    if carried:  # the file's own eval settings (written by this library since it records them)
        model.pretrained_given = {k: str(source) for k in carried if k in TRANSFORM_SETTINGS}
    if info.class_names and len(info.class_names) == model.config.num_classes:
        model.class_names = list(info.class_names)
    return model
