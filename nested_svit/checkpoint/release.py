"""What a baseline's release file says about the model it was trained as: EViT's (and DynamicViT's, when
it is there) training ``args`` carry the keep rate, where it acts and whether dropped tokens are fused;
EViT is released at several keep rates, so a file must not silently run at another one."""
from __future__ import annotations

import ast

from ..config import Pruning


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
    if "base_rate" in values:  # DynamicViT's main.py: ratios rho, rho^2, rho^3 at blocks 3, 6, 9
        rho = float(values["base_rate"])
        return (Pruning("dynamicvit", (3, 6, 9), (rho, rho ** 2, rho ** 3)),
                f"DynamicViT at keep ratio {rho:g} (targets {rho:g}, {rho ** 2:.3g}, {rho ** 3:.3g}) in blocks 3, 6, 9")
    return None


def same_pruning(a: Pruning, b: Pruning, b_options: object) -> bool:
    """Whether the release's pruning ``a`` is the model's (``b``, options resolved as ``b_options``)."""
    if a.method != b.method or a.blocks != b.blocks:
        return False
    if any(abs(x - y) > 1e-6 for x, y in zip(a.keep_targets, b.keep_targets)):
        return False
    return all(getattr(b_options, k, v) == v for k, v in a.options.items())
