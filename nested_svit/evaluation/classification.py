"""Classification metrics from per-image prediction rows."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import ViTConfig
from .testsets import scored_rows
from .usage import usage_summary


def classification_metrics(rows: pd.DataFrame, config: ViTConfig, tokens_per_image: int, topk: int = 5,
                           valid: tuple[int, ...] | None = None) -> dict:
    """top-1 / top-5 (%) over decodable labelled images (``valid``: only those labelled by one of these
    classes, ``--valid-labels``), keep ratios and a token-usage histogram.

    rows: one row per image with ``status``, ``label``, ``top{r}_id`` and ``kept_b{b}`` columns.
    """
    ok = rows[rows["status"] == "ok"]
    labelled = scored_rows(rows, valid)
    k = min(topk, sum(c.startswith("top") and c.endswith("_id") for c in rows.columns))
    top_ids = labelled[[f"top{r + 1}_id" for r in range(k)]].to_numpy() if k else np.zeros((0, 0))
    labels = labelled["label"].to_numpy()
    n = len(labelled)
    top1 = float((top_ids[:, 0] == labels).mean() * 100) if n else float("nan")
    top5 = float((top_ids == labels[:, None]).any(1).mean() * 100) if n else float("nan")
    skipped = rows[rows["status"] != "ok"]
    return {
        "top1": top1, "top5": top5, "num_images": int(n), "num_predicted": int(len(ok)),
        "num_skipped": int(len(skipped)),
        "skipped": [{"id": r.id, "reason": r.error} for r in skipped.itertuples()],
        **usage_summary(ok, config.gate_blocks, float(tokens_per_image)),
    }
