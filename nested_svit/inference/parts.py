"""The part files of one run: each finished global batch ``[i*b, (i+1)*b)`` is one parquet file under
``<out>.parts/``, written atomically, so an interrupted run resumes where it stopped and the merged
output has every image exactly once. The run record (``manifest.json``) ties the parts to the run (model,
checkpoint, data, batch size, ...): parts of a different run are never mixed in. ``finish`` merges them
into the output file (``writers.write_rows``, by its suffix). Shared by every engine (local, torchrun,
Ray): they differ only in who computes a batch, never in how it is committed."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from ..data.records import PARTS_MARKER, mark_output_folder
from ..distributed import DistInfo
from ..io import atomic_write, atomic_write_bytes, atomic_write_text

RUN_RECORD_FILE = "manifest.json"  # the run record of a parts folder (its name kept: earlier folders resume)
# integer columns of rows (nullable: skipped images leave gaps)
INTEGER_COLUMNS = ("index", "label", "orientation", "image_id", "height", "width", "num_detections", "total_tokens")


def part_path(parts_dir: Path, batch: int, prefix: str = "batch-") -> Path:
    """The part file of global batch ``batch``."""
    return Path(parts_dir) / f"{prefix}{batch:07d}.parquet"


def plain(record: dict) -> dict:
    """``record`` as it reads back from JSON (tuples as lists, sorted keys)."""
    return json.loads(json.dumps(record, sort_keys=True))


def check_run_record(parts_dir: Path, run_record: dict, is_main: bool = True, name: str = RUN_RECORD_FILE,
                     marker: str = PARTS_MARKER) -> None:
    """Refuse ``parts_dir`` when it holds parts of another run (naming what differs); else write
    ``run_record`` there (the main process) as ``name``, creating the folder with its ``marker``."""
    path = Path(parts_dir) / name
    if path.exists():
        refuse_other_run(parts_dir, json.loads(path.read_text()), run_record)
    elif is_main:
        mark_output_folder(parts_dir, marker)  # never read back as input by a later run
        atomic_write_text(path, json.dumps(run_record, indent=1, sort_keys=True))


def refuse_other_run(where, recorded: dict, run_record: dict) -> None:
    """Refuse partial results at ``where`` whose ``recorded`` run record is not ``run_record``, naming what differs."""
    new = plain(run_record)
    if recorded != new:
        diff = sorted(k for k in set(recorded) | set(new) if recorded.get(k) != new.get(k))
        raise RuntimeError(f"{where} holds partial results of a different run (differs in {diff}); "
                           "delete it or choose another --out")


def integer_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its integer columns as nullable integers (skipped rows leave gaps), in place."""
    for col in frame.columns:
        if col in INTEGER_COLUMNS or (col.startswith("top") and col.endswith("_id")) or col.startswith("kept_b"):
            frame[col] = frame[col].astype("Int64")
    return frame


def merge_parts(parts_dir: Path, num_records: int, prefix: str = "batch-") -> pd.DataFrame:
    """All part files -> one frame sorted by index; checks that every image appears exactly once."""
    files = sorted(Path(parts_dir).glob(f"{prefix}*.parquet"))
    return merged([pd.read_parquet(f) for f in files], num_records, parts_dir)


def merged(frames: list[pd.DataFrame], num_records: int, where) -> pd.DataFrame:
    """The parts' frames -> one frame sorted by index; checks that every image appears exactly once."""
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    frame = frame.sort_values("index", kind="stable").reset_index(drop=True) if len(frame) else frame
    integer_columns(frame)
    if len(frame) != num_records or frame["index"].duplicated().any() or \
            (len(frame) and frame["index"].tolist() != list(range(num_records))):
        raise RuntimeError(f"{where}: expected one row for each of {num_records} images, found {len(frame)} rows "
                           f"({frame['index'].duplicated().sum() if len(frame) else 0} duplicated)")
    return frame


def remove_parts(parts_dir: Path) -> None:
    shutil.rmtree(parts_dir, ignore_errors=True)


@dataclass
class PartStore:
    """The parts of one run: ``num_records`` images in global batches of ``batch_size``; process
    ``dist.rank`` of ``dist.world_size`` owns batches ``rank, rank + world, ...`` (so a batch holds the
    same images at any number of processes, and the rows do not depend on it). ``out``: the file the
    merged rows are written to (None: the rows are a result's input, not an output: ``eval``)."""

    parts_dir: Path
    run_record: dict
    batch_size: int
    num_records: int
    dist: DistInfo = field(default_factory=DistInfo)
    out: Path | None = None
    prefix = "batch-"  # part files: <prefix><batch>.parquet
    marker = PARTS_MARKER

    def open(self) -> tuple[list[list[int]], list[str]]:
        """Check the run record (parts of another run are refused; a new run's is written) -> (index
        lists of this process's pending batches, lines a user should read). Once per run."""
        notes = []
        if self.out is not None and Path(self.out).exists() and not Path(self.parts_dir).exists():
            notes.append(f"note: {self.out} exists (a finished run's output): it is computed again with these flags "
                         "and replaced")
        check_run_record(self.parts_dir, self.run_record, self.dist.is_main, RUN_RECORD_FILE, self.marker)
        Path(self.parts_dir).mkdir(parents=True, exist_ok=True)
        return self.pending(), notes

    def part_path(self, batch: int) -> Path:
        return part_path(self.parts_dir, batch, self.prefix)

    def side_file(self, name: str) -> Path:
        """A file of the run beside its parts that is not a part (the Ray engine's manifest)."""
        return Path(self.parts_dir) / name

    def batch_of(self, indices) -> int:
        """The global batch the images ``indices`` belong to."""
        return min(int(i) for i in indices) // self.batch_size

    def owned(self) -> list[list[int]]:
        """Index lists of this process's global batches."""
        n, b = self.num_records, self.batch_size
        return [list(range(i * b, min((i + 1) * b, n))) for i in range(self.dist.rank, (n + b - 1) // b,
                                                                       self.dist.world_size)]

    def pending(self) -> list[list[int]]:
        """Index lists of this process's global batches that have no part file yet."""
        return [batch for batch in self.owned() if not self.part_path(self.batch_of(batch)).exists()]

    def commit(self, batch: int, rows: pd.DataFrame | bytes) -> None:
        """Write batch ``batch``'s rows (a frame, or the parquet bytes of one) atomically as its part."""
        path = self.part_path(batch)
        if isinstance(rows, bytes):
            atomic_write_bytes(path, rows)
        else:
            atomic_write(path, lambda tmp: rows.to_parquet(tmp, index=False))

    def merge(self) -> pd.DataFrame:
        return merge_parts(self.parts_dir, self.num_records, self.prefix)

    def finish(self, meta: dict, columns: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> pd.DataFrame:
        """Merge the parts, add ``columns(rows)``, write them to ``out`` by its suffix with ``meta`` (the
        run's provenance, which also marks the file as ours), remove the parts -> the rows."""
        from .writers import write_rows

        rows = self.merge()
        rows = columns(rows) if columns is not None else rows
        write_rows(rows, Path(self.out), meta)
        self.remove()
        return rows

    def remove(self) -> None:
        remove_parts(self.parts_dir)

