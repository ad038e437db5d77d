"""Classifiers built from a checkpoint, and ``create_model`` with timm's keyword arguments.

``classifier_for(source, name)`` is the one place that turns a file into a model: a file this library
wrote carries its model; a baseline's release file configures its method's model from its training args;
any other file, folder or ``hf-hub:`` name describes its architecture, head, input size, preprocessing and
label names (``describe``), which a given ``name`` and overrides take precedence over."""
from __future__ import annotations

import dataclasses
import os

from ..model import SparseViT
from ..registry import build_model, get_config
from .describe import describe
from .convert import detect_format
from .loader import classifier_from_file, load_checkpoint, models_like, release_model
from .location import is_folder_source
from .reader import CheckpointError, LoadReport, read
from .writer import file_info

DEFAULT_CLASSIFIER = "svit_small"


def classifier_for(source: str | os.PathLike | None, name: str | None = None, **overrides
                   ) -> tuple[SparseViT, LoadReport | None, list[str]]:
    """(the model ``source`` describes with its weights loaded, the load report, lines a user should
    read); ``source`` None: ``name`` (else the default) with random weights. ``overrides``: config fields
    (``img_size``, ``num_classes``, ...), applied over what the file says."""
    source, named = (None if source is None else str(source)), name
    info = file_info(source)
    carried = info.kind == "classifier"
    if carried and name and info.model_name and name != info.model_name:
        raise ValueError(f"--model {name} but {source} holds a trained {info.model_name}; drop --model")
    release = release_model(source) if source and not carried and name is None else None
    ckpt, described = None, None
    if source and not carried and not release:
        ckpt = read(source)  # read once: described here, loaded below
        if not detect_format(ckpt.state).startswith("mmdet"):  # a detector file: the loader says so
            if name is not None:
                get_config(name)  # unknown names fail here with the list of models
            described = describe(ckpt, models_like(ckpt) if name is None else [], name)
    name = (info.model_name if carried else None) or name or (release[0] if release else None) or \
        (described.name if described else DEFAULT_CLASSIFIER)
    messages = []
    overrides = {**(dict(release[1]) if release else {}), **{k: v for k, v in overrides.items() if v is not None}}
    if release:
        messages.append(f"note: {source} is {release[2]} (its training args): running {name} configured so")
    if carried:
        model = classifier_from_file(source, **overrides)
        model.name = name
    elif described is not None:
        model = SparseViT(dataclasses.replace(described.config, **overrides))
        model.name, model.pretrained_cfg, model.pretrained_given = name, described.pretrained_cfg, described.given
        if described.class_names and len(described.class_names) == model.config.num_classes:
            model.class_names = described.class_names
        if named is None:
            messages.append(f"note: {source}: {described.how}: running {name} at {model.config.img_size} px, "
                            f"{model.config.num_classes} classes")
    else:
        get_config(name)  # unknown names fail here with the list of models
        model = build_model(name, **overrides)
    size = model.config.img_size
    if size % model.config.patch_size:
        raise ValueError(f"--img-size {size} is not a multiple of the patch size {model.config.patch_size}")
    report = load_checkpoint(model, ckpt or source) if source else None
    if report is not None and described is not None:
        report.notes.insert(0, f"read as {described.how}; eval settings from the file: "
                               f"{', '.join(sorted(described.given)) or 'none'}")
    if report is not None:  # a position table resized is said on the console too, not only in the report
        messages += [f"note: {source}: {n} (the checkpoint's input size is not {size} px)"
                     for n in report.notes if n.startswith("pos_embed interpolated")]
    return model, report, messages


def create_model(model_name: str, pretrained: bool = False, *, checkpoint_path: str | os.PathLike | None = None,
                 pretrained_cfg_overlay: dict | None = None, drop_path_rate: float | None = None,
                 global_pool: str | None = None, **overrides) -> SparseViT:
    """timm's ``create_model``: a registered name with random weights, or with weights from
    ``checkpoint_path`` / ``pretrained_cfg_overlay=dict(file=...)`` (any format ``load_checkpoint``
    reads); ``hf-hub:ORG/NAME`` / ``local-dir:DIR`` with ``pretrained=True`` load from the local cache /
    folder (never the network). ``overrides``: ``num_classes``, ``img_size``, any ``ViTConfig`` field or
    method option (``registry.get_config``); ``drop_path_rate``: stochastic depth for training; other
    ``pretrained_cfg_overlay`` keys (``mean``, ``crop_pct``, ...) replace the eval preprocessing."""
    overlay = dict(pretrained_cfg_overlay or {})
    source = overlay.pop("file", None) or checkpoint_path
    if str(model_name).startswith(("hf-hub:", "local-dir:")) or is_folder_source(model_name):
        if not pretrained:
            raise ValueError(f"create_model({model_name!r}) builds the model a checkpoint describes: pass "
                             "pretrained=True to load it (from the local cache / folder; nothing is downloaded)")
        source, name = source or model_name, None
    elif pretrained and source is None:
        raise ValueError(f"pretrained=True: nested_svit downloads nothing; give the weights on disk: create_model("
                         f"{model_name!r}, checkpoint_path=FILE_OR_DIR), create_model('hf-hub:ORG/NAME', "
                         "pretrained=True) from the local Hugging Face cache, or nested_svit.load_model(FILE | DIR | "
                         "'hf-hub:ORG/NAME')")
    else:
        name = model_name
    if global_pool not in (None, "token"):
        raise ValueError(f"global_pool={global_pool!r}: these models read their class token ('token')")
    if source is None:
        model = build_model(name, **overrides)
    else:
        model, _, _ = classifier_for(source, name, **overrides)
    if overlay:
        bad = sorted(set(overlay) - {"crop_pct", "crop_mode", "interpolation", "mean", "std"})
        if bad:
            raise ValueError(f"pretrained_cfg_overlay keys {bad} are not read here; known: file, crop_pct, "
                             "crop_mode, interpolation, mean, std")
        model.pretrained_cfg = {**model.pretrained_cfg, **overlay}
        model.pretrained_given = {**(model.pretrained_given or {}), **{k: "pretrained_cfg_overlay" for k in overlay}}
    if drop_path_rate:
        model.set_drop_path(drop_path_rate)
    return model


__all__ = ["classifier_for", "create_model", "CheckpointError"]
