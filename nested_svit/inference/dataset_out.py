"""A ``predict`` output that is a partitioned Parquet data set (``--out DIR/`` or ``--out s3://bucket/preds/``):
each finished global batch is committed as ``part-<batch>.parquet``, and those parts are the output, read as
one table by ``pandas.read_parquet``, ``pyarrow.dataset``, Ray Data, Spark, DuckDB. A part appears whole or
not at all: in a folder it is a hidden temporary file renamed; in an object store one PUT (an object is
visible only once complete; stores have no rename, and need none). At the end the parts' schemas are
unified (a batch of skipped images only has a few columns), and ``_manifest.json`` (provenance, rows,
parts) and ``_SUCCESS`` are written. The run's record (``_nested_svit_run.json``) ties an unfinished
output to its run, so an interrupted run resumes; readers skip names that start with ``_`` or ``.``."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pandas as pd

from ..data.objectstore import describe_error, filesystem, is_uri
from ..data.records import DATASET_MARKER, PARQUET_KEY
from ..distributed import DistInfo, barrier
from ..io import atomic_write_bytes
from .parts import PartStore, integer_columns, merged, plain, refuse_other_run

RUN_RECORD = "_nested_svit_run.json"
SUCCESS = "_SUCCESS"
DATASET_MANIFEST = "_manifest.json"


def is_dataset_out(out: str) -> bool:
    """Whether ``--out`` asks for a data set: a folder (ending with ``/``) or an object store prefix."""
    return str(out).endswith(("/", "\\")) or is_uri(out)


class Location:
    """A folder or an object store prefix, by its fsspec filesystem: names under it, read, write whole
    (atomic: a renamed temporary file, or one PUT), list, delete."""

    def __init__(self, where: str | Path):
        self.text = str(where).rstrip("/\\")
        self.remote = is_uri(self.text)
        if self.remote:
            self.fs, self.root = filesystem(self.text + "/")
            self.root = self.root.rstrip("/")
        else:
            import fsspec

            self.fs, self.root = fsspec.filesystem("file"), str(Path(self.text).resolve())

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _said(self, error: Exception) -> Exception:
        """A store's error as one line (local errors pass as they are)."""
        return ValueError(describe_error(self.text + "/", error)) if self.remote else error

    def names(self) -> list[str]:
        """The names directly under it (one listing, never a cached one)."""
        try:
            self.fs.invalidate_cache(self.root)
            if not self.fs.exists(self.root):
                return []
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        except Exception as e:
            raise self._said(e) from e

    def read(self, name: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(name))
        except Exception as e:
            raise self._said(e) from e

    def write(self, name: str, data: bytes) -> None:
        if not self.remote:
            return atomic_write_bytes(self.path(name), data)
        try:
            self.fs.pipe_file(self.path(name), data)
        except Exception as e:
            raise self._said(e) from e

    def delete(self, name: str) -> None:
        if self.fs.exists(self.path(name)):
            self.fs.rm_file(self.path(name))


def prepare_dataset_output(out: str) -> list[str]:
    """Make ``out`` a data set output -> the note lines. A folder or prefix that holds anything but ours
    is refused; a finished data set is said to be computed again (``DatasetStore.check_manifest`` clears
    it, once the run starts; every process of a torchrun marks it, so every one opens it as a data set)."""
    where = Location(out)
    if not where.remote and Path(where.root).exists() and not Path(where.root).is_dir():
        raise ValueError(f"--out {out} names a data set folder, but {where.text} is a file")
    names = where.names()
    if names and DATASET_MARKER not in names:
        raise ValueError(f"--out {out} holds other files: a data set output needs an empty or new folder or prefix "
                         "(or one an earlier predict wrote)")
    notes = []
    if SUCCESS in names and int(os.environ.get("RANK", "0")) == 0:
        notes.append(f"note: {out} holds a finished run's data set: it is computed again with these flags and replaced")
    if not where.remote:
        Path(where.root).mkdir(parents=True, exist_ok=True)
    where.write(DATASET_MARKER, b"")  # never read back as input by a later run
    return notes


def _parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


class DatasetStore(PartStore):
    """``PartStore`` whose parts are the output, in a folder or an object store prefix (``parts_dir``:
    the ``--out`` as given): named ``part-<batch>.parquet``, each with nullable integer columns and the
    key that keeps it from being read back as input."""

    prefix = "part-"

    @property
    def where(self) -> Location:
        return Location(self.parts_dir)

    def check_manifest(self) -> None:
        """A finished data set is cleared by the main process, and every process waits for that before it
        lists what is pending (one that listed first would take the old parts as done); then the run
        record ties the output to this run, or refuses a different run's parts."""
        where = self.where
        names = where.names()
        if SUCCESS in names and self.dist.is_main:
            for name in [n for n in names if n.startswith(self.prefix)] + [SUCCESS, DATASET_MANIFEST]:
                where.delete(name)
        barrier(self.dist)
        if RUN_RECORD in where.names():
            refuse_other_run(self.parts_dir, json.loads(where.read(RUN_RECORD)), self.manifest)
        elif self.dist.is_main:
            where.write(RUN_RECORD, json.dumps(self.manifest, indent=1, sort_keys=True).encode())

    def part_name(self, batch: int) -> str:
        return f"{self.prefix}{batch:07d}.parquet"

    def side_file(self, name: str) -> Path:
        """Files of the run that are not parts (the Ray engine's record of its images) stay on this
        machine, named by the output and the run record (a stale one of another run is never taken)."""
        import hashlib
        import tempfile

        key = hashlib.sha1(json.dumps([str(self.parts_dir), plain(self.manifest)]).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"nested-svit-{key}-{name}"

    def pending(self) -> list[list[int]]:
        done = set(self.where.names())
        n, b = self.num_records, self.batch_size
        batches = range(self.dist.rank, (n + b - 1) // b, self.dist.world_size)
        return [list(range(i * b, min((i + 1) * b, n))) for i in batches if self.part_name(i) not in done]

    def commit(self, batch: int, rows: pd.DataFrame | bytes) -> None:
        import pyarrow as pa

        frame = integer_columns(pd.read_parquet(io.BytesIO(rows)) if isinstance(rows, bytes) else rows.copy())
        table = pa.Table.from_pandas(frame, preserve_index=False)
        # a column with no value in this batch (names of unlabelled images: NaN floats) takes its type from the
        # parts that have values when the schemas are unified, instead of clashing with them
        empty = [table.num_rows and table[c].null_count == table.num_rows for c in table.column_names]
        schema = pa.schema([pa.field(f.name, pa.null()) if e else f for f, e in zip(table.schema, empty)],
                           metadata=table.schema.metadata)  # pandas' own metadata: its dtypes come back
        table = pa.Table.from_arrays([pa.nulls(table.num_rows) if e else table[c] for c, e in zip(table.column_names, empty)],
                                     schema=schema)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), PARQUET_KEY: b'{"part": true}'})
        self.where.write(self.part_name(batch), _parquet_bytes(table))

    def _parts(self) -> list[str]:
        return [n for n in self.where.names() if n.startswith(self.prefix) and n.endswith(".parquet")]

    def merge(self) -> pd.DataFrame:
        where = self.where
        return merged([pd.read_parquet(io.BytesIO(where.read(n))) for n in self._parts()], self.num_records,
                      self.parts_dir)

    def finish(self, meta: dict, rows: int) -> None:
        """Unify the parts' schemas, then write ``_manifest.json`` and ``_SUCCESS``; the run record goes."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        where, names = self.where, self._parts()
        tables = {n: pq.read_table(io.BytesIO(where.read(n))) for n in names}
        plain_schemas = [t.schema.remove_metadata() for t in tables.values()]
        if any(not s.equals(plain_schemas[0]) for s in plain_schemas):
            unified = pa.unify_schemas(plain_schemas, promote_options="permissive")
            for name, table in tables.items():
                if not table.schema.remove_metadata().equals(unified):  # a batch of skipped images: fewer columns
                    columns = [table[f.name].cast(f.type) if f.name in table.column_names
                               else pa.nulls(table.num_rows, f.type) for f in unified]
                    fixed = pa.Table.from_arrays(columns, schema=pa.schema(unified, metadata=table.schema.metadata))
                    where.write(name, _parquet_bytes(fixed))
        record = {**meta, "rows": int(rows), "output": str(self.parts_dir), "parts": names}
        where.write(DATASET_MANIFEST, json.dumps(record, indent=1, ensure_ascii=False).encode())
        where.write(SUCCESS, b"")
        where.delete(RUN_RECORD)

    def remove(self) -> None:
        """The parts are the output: nothing to remove."""


def open_store(parts_dir: Path | str, manifest: dict, batch_size: int, num_records: int, dist: DistInfo) -> PartStore:
    """The store of a run's rows: part files under ``<out>.parts/`` that are merged into one file at the
    end, or, for a data set output (``predict --out DIR/`` or ``s3://...``), the parts as the output."""
    if is_dataset_out(str(parts_dir)):
        return DatasetStore(str(parts_dir), manifest, batch_size, num_records, dist)
    return PartStore(Path(parts_dir), manifest, batch_size, num_records, dist)
