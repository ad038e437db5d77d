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
from pathlib import Path

import pandas as pd

from ..data.objectstore import describe_error, filesystem, is_uri
from ..data.records import DATASET_MARKER, PARQUET_KEY
from ..distributed import DistInfo, barrier
from ..io import atomic_write_bytes
from .parts import PartStore, integer_columns, merged, plain, refuse_other_run

RUN_RECORD = "_nested_svit_run.json"
SUCCESS = "_SUCCESS"
DATASET_SUMMARY = "_manifest.json"  # the finished data set's provenance, rows and parts (the name Spark-like readers skip)


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
        """The object's bytes; FileNotFoundError as it is (a missing name), any other error as one line."""
        try:
            return self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            raise
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

    def open(self) -> tuple[list[list[int]], list[str]]:
        """Make the folder or prefix this run's data set, with one listing -> (this process's pending
        batches, lines a user should read). One that holds anything but ours is refused; a finished data
        set is cleared by the main process (and said to be computed again), and every process waits for
        that before it takes what is pending (one that listed first would take the old parts as done);
        then the run record ties the output to this run, or refuses a different run's parts."""
        where = self.where
        if not where.remote and Path(where.root).exists() and not Path(where.root).is_dir():
            raise ValueError(f"--out {self.parts_dir} names a data set folder, but {where.text} is a file")
        names = set(where.names())
        if names and DATASET_MARKER not in names:
            raise ValueError(f"--out {self.parts_dir} holds other files: a data set output needs an empty or new folder "
                             "or prefix (or one an earlier predict wrote)")
        notes = []
        if SUCCESS in names:
            notes.append(f"note: {self.parts_dir} holds a finished run's data set: it is computed again with these "
                         "flags and replaced")
            finished = {n for n in names if n.startswith(self.prefix)} | {SUCCESS, DATASET_SUMMARY}
            if self.dist.is_main:
                for name in sorted(finished & names):
                    where.delete(name)
            names -= finished
        if DATASET_MARKER not in names:
            if not where.remote:
                Path(where.root).mkdir(parents=True, exist_ok=True)
            where.write(DATASET_MARKER, b"")  # never read back as input by a later run
        barrier(self.dist)
        if self.dist.world_size > 1:  # what the main process cleared and recorded, seen by every process
            names = set(where.names())
        if RUN_RECORD in names:
            refuse_other_run(self.parts_dir, json.loads(where.read(RUN_RECORD)), self.run_record)
        elif self.dist.is_main:
            where.write(RUN_RECORD, json.dumps(self.run_record, indent=1, sort_keys=True).encode())
        return self._pending_in(names), notes

    def _pending_in(self, names: set[str]) -> list[list[int]]:
        """This process's batches whose part is not among ``names``."""
        return [batch for batch in self.owned() if self.part_name(self.batch_of(batch)) not in names]

    def pending(self) -> list[list[int]]:
        """This process's batches with no part yet (one listing; ``open`` lists once for this and the record)."""
        return self._pending_in(set(self.where.names()))

    def part_name(self, batch: int) -> str:
        return f"{self.prefix}{batch:07d}.parquet"

    def side_file(self, name: str) -> Path:
        """Files of the run that are not parts (the Ray engine's record of its images) stay on this
        machine, named by the output and the run record (a stale one of another run is never taken)."""
        import hashlib
        import tempfile

        key = hashlib.sha1(json.dumps([str(self.parts_dir), plain(self.run_record)]).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"nested-svit-{key}-{name}"

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
        """Every batch's part name: the run's parts are known without listing the store."""
        return [self.part_name(i) for i in range((self.num_records + self.batch_size - 1) // self.batch_size)]

    def _read_parts(self) -> dict[str, bytes]:
        """The parts that are there (a missing one: ``merged`` names what is short)."""
        where, found = self.where, {}
        for name in self._parts():
            try:
                found[name] = where.read(name)
            except FileNotFoundError:  # a store's other errors (credentials, network) are said, not taken as a gap
                continue
        return found

    def merge(self) -> pd.DataFrame:
        return merged([pd.read_parquet(io.BytesIO(data)) for data in self._read_parts().values()], self.num_records,
                      self.parts_dir)

    def finish(self, meta: dict, columns=None) -> pd.DataFrame:
        """Check that every image has its row, unify the parts' schemas, then write ``_manifest.json`` (the
        data set's summary: ``meta``, rows, parts) and ``_SUCCESS``; the run record goes. -> the rows.
        ``columns``: none (a data set has no picture column)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if columns is not None:
            raise ValueError("a data set output has no picture column; --save-vis needs a file --out")
        where, parts = self.where, self._read_parts()
        rows = merged([pd.read_parquet(io.BytesIO(data)) for data in parts.values()], self.num_records, self.parts_dir)
        names = list(parts)
        tables = {n: pq.read_table(io.BytesIO(data)) for n, data in parts.items()}
        plain_schemas = [t.schema.remove_metadata() for t in tables.values()]
        if any(not s.equals(plain_schemas[0]) for s in plain_schemas):
            unified = pa.unify_schemas(plain_schemas, promote_options="permissive")
            for name, table in tables.items():
                if not table.schema.remove_metadata().equals(unified):  # a batch of skipped images: fewer columns
                    columns = [table[f.name].cast(f.type) if f.name in table.column_names
                               else pa.nulls(table.num_rows, f.type) for f in unified]
                    fixed = pa.Table.from_arrays(columns, schema=pa.schema(unified, metadata=table.schema.metadata))
                    where.write(name, _parquet_bytes(fixed))
        record = {**meta, "rows": int(len(rows)), "output": str(self.parts_dir), "parts": names}
        where.write(DATASET_SUMMARY, json.dumps(record, indent=1, ensure_ascii=False).encode())
        where.write(SUCCESS, b"")
        where.delete(RUN_RECORD)
        return rows

    def remove(self) -> None:
        """The parts are the output: nothing to remove."""


def open_store(out: Path | str | None, parts_dir: Path | str, run_record: dict, batch_size: int, num_records: int,
               dist: DistInfo) -> PartStore:
    """The store of a run's rows: part files in ``parts_dir`` that are merged into ``out`` at the end (None:
    into a result, ``eval``), or, for a data set output (``predict --out DIR/`` or ``s3://...``), the parts
    as the output."""
    if out is not None and is_dataset_out(str(out)):
        return DatasetStore(str(out), run_record, batch_size, num_records, dist, str(out))
    return PartStore(Path(parts_dir), run_record, batch_size, num_records, dist, Path(out) if out is not None else None)
