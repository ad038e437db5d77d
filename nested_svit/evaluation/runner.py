"""Sharded, resumable batch inference producing one row per image.

The data set is cut into fixed global batches ``[i*b, (i+1)*b)``. Process ``r`` of ``W`` runs batches
``r, r+W, ...``, so every batch holds the same images as in a single process and the rows do not
depend on the number of processes. Each finished batch is written atomically as its own part file
under ``<out>.parts/``; a restarted run skips finished batches, so an interrupted job resumes where it
stopped and the merged output has each image exactly once. A manifest ties the parts to the run
(model, checkpoint, data, batch size, top-k) so parts of a different run are never mixed in.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch.utils.data import DataLoader

from ..data.dataset import ImageRecordDataset, collate_records
from ..data.device_decode import DeviceJpegDecoder
from ..data.prefetch import prefetched
from ..data.transforms import EvalTransform
from ..io import atomic_write, atomic_write_text
from ..model import SparseViT
from ..devices import is_real_cuda
from ..distributed import DistInfo


@dataclass
class InferenceJob:
    model: SparseViT
    dataset: ImageRecordDataset
    parts_dir: Path
    manifest: dict
    batch_size: int = 128
    workers: int = 2
    topk: int = 5
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dist: DistInfo = field(default_factory=DistInfo)
    class_names: list[str] | None = None  # the MODEL's output classes (not the data's folders)
    on_batch: Callable[[dict, torch.Tensor, object], None] | None = None  # (batch, images, usage): pictures
    # the dataset's images are uint8 crops (``transform.crop``), normalised by ``transform`` on the
    # device; None: the dataset's images are the model's input as they are
    transform: EvalTransform | None = None
    decoder: DeviceJpegDecoder | None = None  # --decode gpu: the dataset passes JPEGs on undecoded


@dataclass
class Progress:
    images: int  # predicted by this process in this run
    correct1: int
    labelled: int
    elapsed: float
    seen: int = 0  # predicted or skipped

    def add(self, other: "Progress") -> None:
        self.images += other.images
        self.correct1 += other.correct1
        self.labelled += other.labelled
        self.seen += other.seen


def _check_manifest(job: InferenceJob) -> None:
    path = job.parts_dir / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        job.manifest = json.loads(json.dumps(job.manifest, sort_keys=True))  # tuples -> lists, as stored
        if old != job.manifest:
            diff = sorted(k for k in set(old) | set(job.manifest) if old.get(k) != job.manifest.get(k))
            raise RuntimeError(f"{job.parts_dir} holds partial results of a different run (differs in {diff}); "
                               "delete it or choose another --out")
    elif job.dist.is_main:
        job.parts_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(job.manifest, indent=1, sort_keys=True))


def _part_path(parts_dir: Path, batch: int) -> Path:
    return parts_dir / f"batch-{batch:07d}.parquet"


def _rows(job: InferenceJob, batch: dict, logits: torch.Tensor | None, kept: torch.Tensor | None) -> pd.DataFrame:
    """The output rows of one batch: predicted images, then the skipped ones with their reason."""
    names = job.class_names
    truth = job.dataset.class_names  # ground-truth names of the data's labels
    depth = job.model.config.depth
    rows: list[dict] = []
    if logits is not None:
        probs = logits.float().softmax(-1)
        k = min(job.topk, probs.shape[-1])
        top_p, top_i = probs.topk(k, dim=-1)
        for j, idx in enumerate(batch["index"].tolist()):
            row = {"index": idx, "id": batch["id"][j], "label": int(batch["label"][j]), "status": "ok", "error": "",
                   "orientation": "exif applied" if getattr(job.dataset, "exif", False) else "as stored",
                   "decoder": batch["decoder"][j]}
            label = row["label"]
            row["label_name"] = truth[label] if truth and 0 <= label < len(truth) else None
            for r in range(k):
                cls = int(top_i[j, r])
                row[f"top{r + 1}_id"] = cls
                row[f"top{r + 1}_prob"] = float(top_p[j, r])
                if names:
                    row[f"top{r + 1}_name"] = names[cls] if cls < len(names) else None
            row.update({f"kept_b{b}": int(kept[j, b]) for b in range(depth)})
            rows.append(row)
    for idx, image_id, label, error in batch["failed"]:
        rows.append({"index": idx, "id": image_id, "label": label, "status": "skipped", "error": error})
    return pd.DataFrame(rows)


def write_part(job, batch: dict, frame: pd.DataFrame) -> None:
    """The rows of one finished global batch, written atomically as its part file."""
    batch_id = min(batch["all_index"]) // job.batch_size
    atomic_write(_part_path(job.parts_dir, batch_id), lambda tmp: frame.to_parquet(tmp, index=False))


def pending_batches(job: InferenceJob) -> list[list[int]]:
    """Index lists of this process's global batches that have no part file yet."""
    n, b = len(job.dataset), job.batch_size
    batches = range(job.dist.rank, (n + b - 1) // b, job.dist.world_size)
    return [list(range(i * b, min((i + 1) * b, n))) for i in batches if not _part_path(job.parts_dir, i).exists()]


def prepare_batch(job: InferenceJob) -> Callable[[dict], dict]:
    """A loader batch -> the same with ``images`` the model's input on ``job.device`` (decoded there
    with ``job.decoder``, normalised there with ``job.transform``)."""
    dtype = job.model.dtype

    def prepare(batch: dict) -> dict:
        if job.decoder is not None:
            batch = job.decoder(batch)
        elif batch["images"] is not None:
            batch["images"] = batch["images"].to(job.device, non_blocking=True)
        if batch["images"] is not None:
            images = batch["images"]
            batch["images"] = job.transform.normalize(images, dtype) if job.transform is not None else images.to(dtype)
        return batch

    return prepare


def classify_batch(job: InferenceJob, batch: dict) -> tuple[pd.DataFrame, Progress]:
    """One prepared batch (``images`` the model's input on its device, or None) -> its rows and its
    counts (``Progress`` without times). The one per-batch step of both engines (local and Ray)."""
    logits = kept = None
    counts = Progress(0, 0, 0, 0.0, seen=len(batch["all_index"]))
    if batch["images"] is not None:
        model = job.model
        images = batch["images"]
        feats, usage = model.forward_features(images)
        logits = model.forward_head(feats).cpu()
        kept = (usage.kept if usage.kept_mlp is None else usage.kept_mlp).cpu()  # after each block's selection
        if job.on_batch is not None:
            job.on_batch(batch, images, usage)
        labels = batch["label"]
        has_label = labels >= 0
        counts.correct1 = int((logits.argmax(-1)[has_label] == labels[has_label]).sum())
        counts.labelled = int(has_label.sum())
        counts.images = len(labels)
    return _rows(job, batch, logits, kept), counts


def run_inference(job: InferenceJob, progress: Callable[[Progress], None] | None = None) -> Progress:
    """Run this process's pending batches, writing one part file per batch."""
    _check_manifest(job)
    job.parts_dir.mkdir(parents=True, exist_ok=True)
    todo = pending_batches(job)
    loader = DataLoader(job.dataset, batch_sampler=todo, num_workers=job.workers, collate_fn=collate_records,
                        persistent_workers=False, pin_memory=is_real_cuda(job.device))
    job.model.eval()
    state = Progress(0, 0, 0, 0.0)
    start = time.perf_counter()
    with torch.no_grad():  # not inference_mode: jagged tensors cannot be built from inference tensors
        for batch in prefetched(loader, job.device, prepare_batch(job)):
            frame, counts = classify_batch(job, batch)
            write_part(job, batch, frame)
            state.add(counts)
            state.elapsed = time.perf_counter() - start
            if progress:
                progress(state)
    return state


def merge_parts(parts_dir: Path, num_records: int) -> pd.DataFrame:
    """All part files -> one frame sorted by index; checks every image appears exactly once."""
    files = sorted(parts_dir.glob("batch-*.parquet"))
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame()
    frame = frame.sort_values("index", kind="stable").reset_index(drop=True)
    for col in frame.columns:  # skipped rows leave gaps: keep integer columns integer (nullable)
        if col in ("index", "label") or (col.startswith("top") and col.endswith("_id")) or col.startswith("kept_b"):
            frame[col] = frame[col].astype("Int64")
    if len(frame) != num_records or frame["index"].duplicated().any() or \
            (len(frame) and frame["index"].tolist() != list(range(num_records))):
        raise RuntimeError(f"{parts_dir}: expected one row for each of {num_records} images, found {len(frame)} rows "
                           f"({frame['index'].duplicated().sum() if len(frame) else 0} duplicated)")
    return frame


def remove_parts(parts_dir: Path) -> None:
    shutil.rmtree(parts_dir, ignore_errors=True)
