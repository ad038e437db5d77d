"""A ``predict`` output that is a partitioned Parquet data set (``--out DIR/``): each finished global
batch is committed as ``DIR/part-<batch>.parquet`` (atomically: a temporary hidden file renamed), and those
parts are the output, read as one table by ``pandas.read_parquet(DIR)``, ``pyarrow.dataset``, Ray Data,
Spark, DuckDB. At the end the parts' schemas are unified (a batch of skipped images only has null
columns), and ``_manifest.json`` (provenance, rows, parts) and ``_SUCCESS`` are written. The run's record
(``_nested_svit_run.json``) ties an unfinished folder to its run, so an interrupted run resumes; readers
skip files whose names start with ``_`` or ``.``."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..data.records import DATASET_MARKER, PARQUET_KEY, mark_output_folder
from ..distributed import DistInfo
from ..io import atomic_write, atomic_write_text
from .parts import PartStore, integer_columns

RUN_RECORD = "_nested_svit_run.json"
SUCCESS = "_SUCCESS"
DATASET_MANIFEST = "_manifest.json"


def is_dataset_out(out: str) -> bool:
    """Whether ``--out`` asks for a data set (a folder: it ends with ``/``)."""
    return str(out).endswith(("/", "\\"))


def is_dataset_folder(folder: Path | str) -> bool:
    return (Path(folder) / DATASET_MARKER).exists()


def prepare_dataset_folder(folder: Path) -> list[str]:
    """Make ``folder`` a data set output (created if needed) -> the note lines. A folder that holds
    anything but ours is refused; a finished data set is cleared, to be computed again (by the main
    process of a torchrun: every process marks the folder, so every one opens it as a data set)."""
    import os

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder}/ names a data set folder, but {folder} is a file")
    if folder.exists() and any(folder.iterdir()) and not is_dataset_folder(folder):
        raise ValueError(f"--out {folder}/ holds other files: a data set output needs an empty or new folder "
                         "(or one an earlier predict wrote)")
    notes = []
    if (folder / SUCCESS).exists() and int(os.environ.get("RANK", "0")) == 0:
        for f in [*folder.glob("part-*.parquet"), folder / SUCCESS, folder / DATASET_MANIFEST]:
            f.unlink(missing_ok=True)
        notes.append(f"note: {folder}/ holds a finished run's data set: it is computed again with these flags and replaced")
    mark_output_folder(folder, DATASET_MARKER)
    return notes


class DatasetStore(PartStore):
    """``PartStore`` whose parts are the output: named ``part-<batch>.parquet``, each with nullable
    integer columns and the marker that keeps it from being read back as input."""

    prefix = "part-"
    manifest_name = RUN_RECORD
    marker = DATASET_MARKER

    def side_file(self, name: str) -> Path:
        return Path(self.parts_dir) / f"_{name}"  # never read as a part of the table

    def commit(self, batch: int, rows: pd.DataFrame | bytes) -> None:
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        frame = integer_columns(pd.read_parquet(io.BytesIO(rows)) if isinstance(rows, bytes) else rows.copy())
        table = pa.Table.from_pandas(frame, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), PARQUET_KEY: b'{"part": true}'})
        atomic_write(self.part_path(batch), lambda tmp: pq.write_table(table, tmp))

    def finish(self, meta: dict, rows: int) -> None:
        """Unify the parts' schemas, then write ``_manifest.json`` and ``_SUCCESS``; the run record goes."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = Path(self.parts_dir)
        files = sorted(folder.glob(f"{self.prefix}*.parquet"))
        schemas = {f: pq.read_schema(f) for f in files}
        plain = [s.remove_metadata() for s in schemas.values()]
        if any(not s.equals(plain[0]) for s in plain):
            unified = pa.unify_schemas(plain, promote_options="permissive")
            for f, schema in schemas.items():
                if not schema.remove_metadata().equals(unified):  # a batch of skipped images has fewer columns
                    table = pq.read_table(f)
                    columns = [table[fld.name].cast(fld.type) if fld.name in table.column_names
                               else pa.nulls(table.num_rows, fld.type) for fld in unified]
                    fixed = pa.Table.from_arrays(columns, schema=pa.schema(unified, metadata=schema.metadata))
                    atomic_write(f, lambda tmp, t=fixed: pq.write_table(t, tmp))
        atomic_write_text(folder / DATASET_MANIFEST, json.dumps(
            {**meta, "rows": int(rows), "output": f"{folder}/", "parts": [f.name for f in files]}, indent=1,
            ensure_ascii=False))
        atomic_write_text(folder / SUCCESS, "")
        (folder / RUN_RECORD).unlink(missing_ok=True)

    def remove(self) -> None:
        """The parts are the output: nothing to remove."""


def open_store(parts_dir: Path, manifest: dict, batch_size: int, num_records: int, dist: DistInfo) -> PartStore:
    """The store of a run's rows: part files under ``<out>.parts/`` that are merged into one file at the
    end, or, where ``parts_dir`` is marked a data set (``predict --out DIR/``), the parts as the output."""
    kind = DatasetStore if is_dataset_folder(parts_dir) else PartStore
    return kind(Path(parts_dir), manifest, batch_size, num_records, dist)


