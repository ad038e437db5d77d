"""What a baseline's release file says about the model it was trained as: EViT's (and DynamicViT's, when
it is there) training ``args`` carry the keep rate, where it acts and whether dropped tokens are fused;
EViT is released at several keep rates, so a file must not silently run at another one. ATC's and MCTF's
args likewise (linkage and keep rate; r, criteria and blocks)."""
from __future__ import annotations

import ast

from ..config import Pruning
from .reader import CheckpointError


def _locations(value: object) -> tuple[int, ...]:
    if isinstance(value, str):
        value = ast.literal_eval(value)
    return tuple(int(v) for v in value)


def release_pruning(top: dict | None) -> tuple[Pruning, str] | None:
    """(the pruning a release file was trained with, a description) from its ``args``, else None."""
    args = (top or {}).get("args")
    values = vars(args) if hasattr(args, "__dict__") else args if isinstance(args, dict) else None
    if not values:
        return None
    if "base_keep_rate" in values or ("fuse_token" in values and "drop_loc" in values):  # EViT's main.py
        rate = float(values.get("base_keep_rate", 0.7))
        blocks = _locations(values.get("drop_loc", "(3, 6, 9)"))
        fuse = bool(values.get("fuse_token", False))
        return (Pruning("evit", blocks, (rate,) * len(blocks)).with_options(fuse_token=fuse),
                f"EViT at keep rate {rate:g} in blocks {', '.join(map(str, blocks))}, "
                f"{'with' if fuse else 'without'} the fused token")
    if str(values.get("model", "")).startswith("atc_") and "reduction_loc" in values:  # ATC's train_deit.py
        blocks = _locations(values["reduction_loc"])
        ratios = [float(r) for r in values.get("reduction_ratio") or ()]
        if len(ratios) != 1:  # the authors read several values as cluster counts at a 224 input
            raise CheckpointError(f"ATC release args with reduction_ratio {ratios}: only one keep rate (its powers "
                                  "at each reduction block) is supported")
        linkage = str(values.get("linkage", "average"))
        proportional = bool(values.get("proportional_attn", False))
        targets = tuple(ratios[0] ** (k + 1) for k in range(len(blocks)))
        return (Pruning("atc", blocks, targets, options={"linkage": linkage, "proportional_attn": proportional}),
                f"ATC with {linkage} linkage at keep rate {ratios[0]:g} in blocks {', '.join(map(str, blocks))}, "
                f"{'with' if proportional else 'without'} proportional attention")
    if values.get("use_mctf") and "mctf_type" in values:  # MCTF's main.py
        return _mctf(values)
    if "base_rate" in values:  # DynamicViT's main.py: ratios rho, rho^2, rho^3 at blocks 3, 6, 9
        rho = float(values["base_rate"])
        return (Pruning("dynamicvit", (3, 6, 9), (rho, rho ** 2, rho ** 3)),
                f"DynamicViT at keep ratio {rho:g} (targets {rho:g}, {rho ** 2:.3g}, {rho ** 3:.3g}) in blocks 3, 6, 9")
    return None


def _mctf(values: dict) -> tuple[Pruning, str]:
    """MCTF's args: ``mctf_type`` [r, r_teacher, trace_source, prop_attn, one_step_ahead, tau_sim, tau_info,
    tau_size, bidirection, pooling_type, ...], ``r_evals`` (the r its eval uses), ``activate_layer``."""
    kind = [float(v) for v in _listed(values["mctf_type"])]
    if len(kind) < 10 or (kind[3], kind[4], kind[9]) != (1, 1, 1):
        raise CheckpointError(f"MCTF release args with mctf_type {kind}: only proportional attention, one-step-"
                              "ahead attention and attention pooling (entries 3, 4, 9 = 1, as its eval scripts) "
                              "are supported")
    r = float((_listed(values.get("r_evals")) or [kind[0]])[0])
    r = int(r) if r >= 1 else r
    blocks = _locations(values.get("activate_layer", list(range(1, 12))))
    options = {"r": r, "tau_sim": kind[5], "tau_info": kind[6], "tau_size": kind[7], "bidirection": bool(kind[8])}
    return (Pruning("mctf", blocks, (1.0,) * len(blocks), options=options),
            f"MCTF fusing r={r:g} in blocks {', '.join(map(str, blocks))} (tau {kind[5]:g}/{kind[6]:g}/{kind[7]:g}, "
            f"{'two-way' if kind[8] else 'one-way'} matching)")


def _listed(value: object) -> list:
    if isinstance(value, str):
        value = ast.literal_eval(value)
    return list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]


def same_pruning(a: Pruning, b: Pruning, b_options: object) -> bool:
    """Whether the release's pruning ``a`` is the model's (``b``, options resolved as ``b_options``)."""
    if a.method != b.method or a.blocks != b.blocks:
        return False
    if any(abs(x - y) > 1e-6 for x, y in zip(a.keep_targets, b.keep_targets)):
        return False
    return all(getattr(b_options, k, v) == v for k, v in a.options.items())
