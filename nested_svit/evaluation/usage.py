"""Token usage summary of per-image result rows (classification and detection alike)."""
from __future__ import annotations

import numpy as np
import pandas as pd


def usage_summary(ok: pd.DataFrame, gate_blocks: tuple[int, ...] | list[int], totals: pd.Series | float) -> dict:
    """Mean keep ratio per gated block (``kept_b{b}`` / the image's tokens ``totals``) over the predicted rows
    ``ok``, their mean over the gates, and a 10-bin histogram of the ratios per block."""
    edges = np.linspace(0, 1, 11)
    keep, hist = {}, {}
    for b in gate_blocks:
        ratio = (ok[f"kept_b{b}"].astype(float) / totals).to_numpy(dtype=float) if len(ok) else np.zeros(0)
        keep[f"block{b}"] = float(ratio.mean()) if len(ratio) else float("nan")
        hist[f"block{b}"] = np.histogram(ratio, bins=edges)[0].tolist()
    return {"mean_keep_ratio": keep,
            "mean_keep_ratio_all_gates": float(np.mean(list(keep.values()))) if keep else 1.0,
            "token_usage_histogram": {"bin_edges": edges.round(2).tolist(), "counts": hist}}
