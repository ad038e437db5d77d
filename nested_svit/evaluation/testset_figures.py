"""The figures the ImageNet test sets' papers and timm's results files report, from per-image rows:
ReaL top-1/top-5, per-class accuracy, calibration (ECE over 15 equal-width bins, as torchmetrics'
``CalibrationError(norm="l1", n_bins=15)``; NLL of the true class), and the table of several sets in
timm's columns (``model, img_size, top1, top1_err, top5, top5_err, param_count, crop_pct,
interpolation``) with the differences to a base set."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..data.testset_labels import real_name

TIMM_COLUMNS = ("model", "img_size", "top1", "top1_err", "top5", "top5_err", "param_count", "crop_pct",
                "interpolation")
# the smallest positive float32: a label probability that underflowed to 0 counts -log of this (103.28)
TINY_PROB = float(np.finfo(np.float32).smallest_subnormal)


def scored_rows(rows: pd.DataFrame, valid: tuple[int, ...] | None = None) -> pd.DataFrame:
    """The rows top-1/top-5 count: predicted, labelled, and (with ``--valid-labels``) labelled by one
    of the ``valid`` classes."""
    ok = rows[(rows["status"] == "ok") & (rows["label"].fillna(-1) >= 0)]
    return ok[ok["label"].isin(list(valid))] if valid is not None else ok


def top_ids(rows: pd.DataFrame, k: int, classes: int) -> np.ndarray | None:
    """``[n, min(k, classes)]``: the first predicted class ids of ``rows`` (``classes``: how many the
    top-k was taken over); None when the rows hold fewer (a run with a smaller ``--topk``)."""
    have = sum(c.startswith("top") and c.endswith("_id") for c in rows.columns)
    need = min(k, classes)
    if have < need:
        return None
    return rows[[f"top{r + 1}_id" for r in range(need)]].to_numpy(dtype=np.int64).reshape(len(rows), need)


def real_metrics(rows: pd.DataFrame, real: dict[str, tuple[int, ...]]) -> dict:
    """ReaL (as its reference code scores): an image is right at top-k when any of its top-k ids is among
    its ReaL labels; images matched by val file name (``data.testset_labels.real_name``), those with no ReaL
    label left out (and counted)."""
    ok = rows[rows["status"] == "ok"]
    lists = [real.get(real_name(i)) for i in ok["id"]]
    matched = [j for j, labels in enumerate(lists) if labels is not None]
    scored = [j for j in matched if lists[j]]
    top = {k: top_ids(ok, k, 1000) for k in (1, 5)}
    hits = {k: [bool(set(top[k][j].tolist()) & set(lists[j])) for j in scored] if top[k] is not None else []
            for k in (1, 5)}
    mean = (lambda v: float(np.mean(v) * 100) if v else float("nan"))
    return {"real_top1": mean(hits[1]), "real_top5": mean(hits[5]), "real_num_images": len(scored),
            "real_num_empty": len(matched) - len(scored), "real_num_unmatched": len(ok) - len(matched)}


def per_class(rows: pd.DataFrame, names: list[str] | None, classes: int) -> pd.DataFrame:
    """``class_index, class_name, images, top1, top5`` (%) of every class the scored ``rows`` hold
    (``classes``: how many the top-k was taken over; top5 NaN where the rows hold fewer than 5 ids)."""
    if not len(rows):
        return pd.DataFrame(columns=["class_index", "class_name", "images", "top1", "top5"])
    top1, top5 = top_ids(rows, 1, classes), top_ids(rows, 5, classes)
    labels = rows["label"].to_numpy(dtype=np.int64)
    frame = pd.DataFrame({"class_index": labels, "hit1": top1[:, 0] == labels,
                          "hit5": (top5 == labels[:, None]).any(1) if top5 is not None else np.nan})
    table = frame.groupby("class_index").agg(images=("hit1", "size"), top1=("hit1", "mean"), top5=("hit5", "mean"))
    table[["top1", "top5"]] *= 100
    table = table.reset_index()
    table.insert(1, "class_name", [names[i] if names and 0 <= i < len(names) else None for i in table["class_index"]])
    return table


def reliability_bins(rows: pd.DataFrame, n_bins: int = 15) -> pd.DataFrame:
    """Equal-width bins over the top-1 probability (as torchmetrics: bin ``i`` holds ``[i/n, (i+1)/n)``,
    a probability of exactly 1 a bin of its own): ``lower, upper, images, accuracy, confidence``."""
    if not len(rows):  # nothing scored (every image skipped, or none labelled): empty bins
        confidence = correct = np.zeros(0)
    else:
        confidence = rows["top1_prob"].to_numpy(dtype=np.float64)
        correct = (rows["top1_id"].to_numpy(dtype=np.int64) == rows["label"].to_numpy(dtype=np.int64)).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.searchsorted(edges, confidence, side="right") - 1
    out = []
    for b in range(n_bins + 1):
        inside = which == b
        n = int(inside.sum())
        out.append({"lower": float(edges[b]), "upper": float(edges[b + 1]) if b < n_bins else 1.0, "images": n,
                    "accuracy": float(correct[inside].mean()) if n else float("nan"),
                    "confidence": float(confidence[inside].mean()) if n else float("nan")})
    return pd.DataFrame(out)


def calibration_metrics(rows: pd.DataFrame, n_bins: int = 15) -> dict:
    """``ece``: the L1 expected calibration error (a fraction) over ``reliability_bins``; ``nll``: the
    mean negative log probability of the true class (``label_prob``; an underflowed 0 counts as
    ``TINY_PROB``). NaN without scored rows."""
    if not len(rows):
        return {"ece": float("nan"), "nll": float("nan")}
    bins = reliability_bins(rows, n_bins)
    filled = bins[bins["images"] > 0]
    ece = float((filled["images"] / len(rows) * (filled["accuracy"] - filled["confidence"]).abs()).sum())
    prob = rows["label_prob"].to_numpy(dtype=np.float64) if "label_prob" in rows else np.full(len(rows), np.nan)
    nll = float(-np.log(np.maximum(prob, TINY_PROB)).mean())
    return {"ece": ece, "nll": nll}


def results_table(results: list[dict]) -> pd.DataFrame:
    """One row per evaluated set: timm's columns first, then ``dataset``, then the other flat figures
    of each result, then ``top1_diff`` / ``top5_diff``: this set's minus those of the first set scored
    over the same classes (``diff_to``), as timm's files diff V2, ReaL and Sketch against val and A / R
    against the 200-class "clean" val figure; empty for that first set itself, and against a set with no
    labelled images (its top-1 is NaN)."""
    rows = []
    for result in results:
        transform = result.get("transform") or {}
        top1, top5 = result["top1"], result["top5"]
        timm = {"model": result["model"], "img_size": transform.get("img_size"), "top1": top1,
                "top1_err": 100 - top1 if not math.isnan(top1) else float("nan"), "top5": top5,
                "top5_err": 100 - top5 if not math.isnan(top5) else float("nan"),
                "param_count": result.get("param_count"), "crop_pct": transform.get("crop_pct"),
                "interpolation": transform.get("interpolation")}
        assert tuple(timm) == TIMM_COLUMNS
        flat = {k: v for k, v in result.items() if not isinstance(v, (dict, list)) and k not in timm}
        rows.append({**timm, "dataset": flat.pop("dataset", None), **flat})
    table = pd.DataFrame(rows)
    if len(table):
        def base_of(i: int) -> int | None:  # the first other set over the same classes that has a top-1
            same = [j for j, r in enumerate(results) if r.get("valid_labels") == results[i].get("valid_labels")
                    and not math.isnan(r["top1"])]
            return same[0] if same and same[0] != i and not math.isnan(results[i]["top1"]) else None

        base = [base_of(i) for i in range(len(results))]
        for column in ("top1", "top5"):  # a set is not diffed against itself, nor against one without labels
            table[f"{column}_diff"] = [table[column][i] - table[column][b] if b is not None else float("nan")
                                       for i, b in enumerate(base)]
        table["diff_to"] = [table["dataset"][b] if b is not None else None for b in base]
    return table
