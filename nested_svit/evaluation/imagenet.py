"""The result of ``eval imagenet`` on one test set (top-1/top-5 and, as the set's authors score it,
ReaL and the 200-class figures; per-class accuracy, calibration, keep ratios, the run's record), the
files beside it (``<stem>[.<set>].per_class.csv``, ``<stem>[.<set>].reliability.png``), and the
result files of one set or several (``<out>.json``, and ``<out>.csv`` in timm's columns)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from ..io import atomic_write, atomic_write_text
from ..viz import reliability_diagram
from .classification import agreement_record, classification_metrics
from .results import checkpoint_record, run_record
from .testset_figures import calibration_metrics, per_class, real_metrics, reliability_bins, results_table, scored_rows


@dataclass(frozen=True)
class SetFiles:
    """Where one set's files go: ``per_class`` (CSV), ``reliability`` (PNG)."""

    per_class: Path
    reliability: Path

    @classmethod
    def beside(cls, out: Path, name: str | None) -> "SetFiles":
        """``<stem>.per_class.csv`` / ``<stem>.reliability.png`` beside ``out`` (``name``: of one of
        several sets, ``<stem>.<name>.…``)."""
        stem = out.stem + (f".{name}" if name else "")
        return cls(out.with_name(stem + ".per_class.csv"), out.with_name(stem + ".reliability.png"))


def evaluate_set(job, name: str, files: SetFiles, progress: Callable | None = None) -> tuple[dict, object] | None:
    """Run one set's ``job`` (``inference.classifier_job``) and, on the main process, its result (its
    per-class CSV and reliability diagram written to ``files``; the parts stay until the results file
    is written: ``write_results``) -> (the result, the run's counts: images and seconds of every process)."""
    counts = job.run(progress)
    if not job.dist.is_main:
        return None
    result = set_result(job, job.rows(), name, counts.images, counts.elapsed, files)
    if job.spec.capacity:  # every process's batches of this run whose capacity was too small (rerun)
        result.update(capacity=job.spec.capacity, capacity_reruns_this_run=int(counts.capacity_reruns))
    return result, counts


def set_result(job, rows: pd.DataFrame, name: str, images: float, seconds: float, files: SetFiles) -> dict:
    """The result of one set from its merged ``rows`` (``job``: the set's ``Job``); writes its per-class
    CSV and reliability diagram to ``files``."""
    scoring, topk, batch_size = job.scoring, job.step.topk, job.store.batch_size
    model, records, manifest = job.model, job.dataset.records, job.run_record
    metrics = classification_metrics(rows, model.config, model.config.num_tokens, topk, scoring.valid)
    scored = scored_rows(rows, scoring.valid)
    classes = len(scoring.valid) if scoring.valid else model.config.num_classes
    table = per_class(scored, records.class_names or job.step.class_names, classes)
    calibration = calibration_metrics(scored)
    atomic_write_text(files.per_class, table.to_csv(index=False))
    title = f"{job.built.name} on {name} ({len(scored)} images" + (
        f", top-k over {scoring.valid_name if scoring.valid_name in ('imagenet-a', 'imagenet-r') else 'the valid'} "
        "labels)" if scoring.valid else ")")
    atomic_write(files.reliability, lambda tmp: reliability_diagram(reliability_bins(scored), tmp, title,
                                                                    calibration["ece"]))
    extra = {"num_outside_valid_labels": int(((rows["status"] == "ok") & (rows["label"].fillna(-1) >= 0)).sum()
                                             - len(scored))} if scoring.valid else {}
    return {**checkpoint_record(job.built.name, job.spec.checkpoint, job.built.report), "dataset": name, **metrics,
            **(real_metrics(rows, scoring.real) if scoring.real is not None else {}), **extra,
            "mean_class_top1": float(table["top1"].mean()) if len(table) else float("nan"), **calibration,
            **scoring.describe(), "param_count": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "images_per_sec": images / seconds if seconds > 0 else float("nan"), "images_this_run": int(images),
            "data": manifest["data"], "data_kind": records.kind, "label_source": records.label_source,
            "ignored_files": [{"path": p, "reason": why} for p, why in records.ignored],
            "transform": manifest["transform"], "decode": manifest["decode"], "jpeg_draft": manifest["jpeg_draft"],
            "batch_size": batch_size, "precision": manifest["precision"], "calibration": manifest["calibration"],
            "compile": bool(manifest.get("compile", False)), **agreement_record(rows, manifest),
            "per_class_csv": str(files.per_class), "reliability_png": str(files.reliability),
            **run_record(job.device, job.dist.world_size, manifest["backend"])}


def write_results(results: list[dict], json_out: Path, csv_out: Path, jobs: list = ()) -> None:
    """``json_out``: the result of the one set (as it is), or ``{"sets": [...]}`` of several;
    ``csv_out``: one row per set (``testset_figures.results_table``); then the part files of the sets' ``jobs``
    go (an interrupted run before this point resumes from them)."""
    body = results[0] if len(results) == 1 else {"sets": results}
    atomic_write_text(json_out, json.dumps(body, indent=1, ensure_ascii=False))
    atomic_write_text(csv_out, results_table(results).to_csv(index=False))
    for job in jobs:
        job.store.remove()
