"""Classification metrics from per-image prediction rows."""
from __future__ import annotations

import pandas as pd

from ..config import ViTConfig
from .testset_figures import scored_rows, top_ids
from .usage import usage_summary


def classification_metrics(rows: pd.DataFrame, config: ViTConfig, tokens_per_image: int, topk: int = 5,
                           valid: tuple[int, ...] | None = None) -> dict:
    """top-1 / top-5 (%; top-5 NaN when the rows hold fewer than 5 ids) over decodable labelled images
    (``valid``: only those labelled by one of these classes, ``--valid-labels``), keep ratios and a
    token-usage histogram.

    rows: one row per image with ``status``, ``label``, ``top{r}_id`` and ``kept_b{b}`` columns.
    """
    ok = rows[rows["status"] == "ok"]
    labelled = scored_rows(rows, valid)
    classes = len(valid) if valid is not None else config.num_classes
    ids1, ids5 = top_ids(labelled, 1, classes), top_ids(labelled, 5, classes)
    labels = labelled["label"].to_numpy()
    n = len(labelled)
    top1 = float((ids1[:, 0] == labels).mean() * 100) if n else float("nan")
    # top-5 from the first five ids: NaN when a smaller --topk kept fewer (it was the top-k figure)
    top5 = float((ids5 == labels[:, None]).any(1).mean() * 100) if n and ids5 is not None else float("nan")
    skipped = rows[rows["status"] != "ok"]
    return {
        "top1": top1, "top5": top5, "num_images": int(n), "num_predicted": int(len(ok)),
        "num_skipped": int(len(skipped)),
        "skipped": [{"id": r.id, "reason": r.error} for r in skipped.itertuples()],
        **usage_summary(ok, config.gate_blocks, float(tokens_per_image)),
    }


def agreement_record(rows: pd.DataFrame, manifest: dict) -> dict:
    """``--agreement-with``: the run's decision agreement with the reference precision, from the rows'
    ``agree_*`` columns (exact over any batching or number of processes): ``{"agreement": {"with",
    "kept_tokens", "top1", "images", "tokens_compared"}}``; {} for a run without it."""
    if not manifest.get("agreement_with") or "agree_tokens" not in rows:
        return {}
    ok = rows[rows["status"] == "ok"]
    tokens = int(ok["agree_tokens"].astype("int64").sum())
    equal = int(ok["agree_tokens_equal"].astype("int64").sum())
    top1 = ok["agree_top1"].astype(bool)
    return {"agreement": {"with": manifest["agreement_with"], "kept_tokens": equal / tokens if tokens else 1.0,
                          "top1": float(top1.mean()) if len(top1) else float("nan"), "images": int(len(top1)),
                          "tokens_compared": tokens}}
