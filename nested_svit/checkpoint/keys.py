"""Fitting a converted state dict to a model: the one report of missing, unexpected and mis-shaped
keys, the position-table resize, and leaving out keys nothing uses."""
from __future__ import annotations

import math

from torch import Tensor

from ..layers import resize_pos_embed
from .convert import NOT_USED
from .reader import CheckpointError, LoadReport


def key_listing(title: str, groups: list[tuple[str, list[str]]], limit: int = 40) -> str:
    """``title:`` then one line per non-empty group: ``  missing (3): a, b, c``."""
    lines = [title + ":"]
    for name, keys in groups:
        if keys:
            shown = ", ".join(keys[:limit]) + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")
            lines.append(f"  {name} ({len(keys)}): {shown}")
    return "\n".join(lines)


def mis_shaped(own: dict[str, Tensor], state: dict[str, Tensor]) -> list[str]:
    return sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in set(own) & set(state) if state[k].shape != own[k].shape)


def check_keys(title: str, own: dict[str, Tensor], state: dict[str, Tensor], ignore_missing: set[str] = frozenset()
               ) -> None:
    """Raise one ``CheckpointError`` listing every missing (but ``ignore_missing``), unexpected and
    mis-shaped key of ``state`` against the model's ``own`` state dict."""
    missing = sorted(set(own) - set(state) - set(ignore_missing))
    unexpected = sorted(set(state) - set(own))
    wrong = mis_shaped(own, state)
    if missing or unexpected or wrong:
        raise CheckpointError(key_listing(title, [("missing", missing), ("unexpected", unexpected),
                                                  ("mis-shaped", wrong)]))


def fit_pos_embed(state: dict[str, Tensor], own: dict[str, Tensor], key: str, report: LoadReport) -> None:
    """A position table of another (square) grid size is interpolated (bicubic) in place, with a note."""
    if key not in state or key not in own or state[key].shape == own[key].shape:
        return
    src, dst = state[key], own[key]
    if src.ndim != 3 or src.shape[-1] != dst.shape[-1]:
        return  # mis-shaped: reported by check_keys
    side = math.isqrt(dst.shape[1] - 1)
    try:
        state[key] = resize_pos_embed(src, (side, side))
    except ValueError as e:  # deit3 / distilled layouts: extra tokens or non-square grids
        raise CheckpointError(f"checkpoint {report.source}: {key} {tuple(src.shape)} cannot be resized to "
                              f"{tuple(dst.shape)}: {e}") from e
    report.notes.append(f"pos_embed interpolated (bicubic) from {tuple(src.shape)} to {tuple(dst.shape)}")


def drop_unused(state: dict[str, Tensor], own: dict[str, Tensor], report: LoadReport) -> None:
    """Release keys nothing uses at inference (``convert.NOT_USED``) are left out, with a note."""
    dropped = sorted(k for k in state if k not in own and any(p.fullmatch(k) for p in NOT_USED))
    for k in dropped:
        del state[k]
    if dropped:
        report.notes.append(f"left out {len(dropped)} keys not used at inference ({dropped[0]}, ...)")


def calibration_notes(top: dict | None) -> list[str]:
    """A file written by ``--save-calibrated`` says so: its gate thresholds were shifted, on which images,
    to which keep fractions."""
    cal = (top or {}).get("calibration")
    if not isinstance(cal, dict):
        return []
    reached = ", ".join(f"{r:.3f}" for r in cal.get("reached", []))
    return [f"keep budget calibrated (--save-calibrated) on {cal.get('images')} images of {cal.get('data')}: "
            f"keep fractions {reached}"]


def state_shape(state: dict[str, Tensor]) -> dict:
    """What a (converted, timm-named) classification state dict looks like: embed dim, patch size,
    position-table tokens, blocks, classes, gates (selector groups). Missing pieces are None."""
    def dim(key: str, axis: int):
        t = state.get(key)
        return int(t.shape[axis]) if t is not None and t.ndim > abs(axis) - (axis < 0) else None

    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    gates = {k.split(".")[1] for k in state if k.startswith("gates.")}
    return {"embed_dim": dim("pos_embed", -1) or dim("patch_embed.proj.weight", 0),
            "patch_size": dim("patch_embed.proj.weight", -1), "tokens": dim("pos_embed", 1),
            "depth": len(blocks) or None, "num_classes": dim("head.weight", 0), "gates": len(gates),
            "mlp_hidden": dim("blocks.0.mlp.fc1.weight", 0)}


def describe_shape(shape: dict) -> str:
    """``a ViT with embed dim 64, patch 4, 65 tokens (8x8 patches + class token), 12 blocks, 10 classes, 9 gates``."""
    parts = []
    if shape.get("embed_dim"):
        parts.append(f"embed dim {shape['embed_dim']}")
    if shape.get("patch_size"):
        parts.append(f"patch {shape['patch_size']}")
    if shape.get("tokens"):
        side = math.isqrt(shape["tokens"] - 1)
        grid = f" ({side}x{side} patches + class token)" if side * side == shape["tokens"] - 1 else ""
        parts.append(f"{shape['tokens']} tokens{grid}")
    for key, name in (("depth", "blocks"), ("num_classes", "classes")):
        if shape.get(key):
            parts.append(f"{shape[key]} {name}")
    parts.append(f"{shape['gates']} gates" if shape.get("gates") else "no gates")
    return "a ViT with " + ", ".join(parts)
