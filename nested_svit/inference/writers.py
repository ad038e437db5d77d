"""The files a run writes, by suffix: per-image rows (``.parquet`` with the run's provenance in its
schema metadata, ``.csv``, ``.json``, ``.jsonl``, each with ``<out>.meta.json``) and summary tables
(``.json`` records or ``.csv``). Every write is atomic."""
from __future__ import annotations

import json
from pathlib import Path

ROW_FORMATS = (".parquet", ".csv", ".json", ".jsonl")  # classifiers; detectors (list columns): not .csv
DETECTOR_FORMATS = (".parquet", ".json", ".jsonl")


def plain_records(rows) -> list[dict]:
    """Rows as JSON-ready records: floats at full precision (``repr``), missing values as null, numpy
    and pandas scalars and arrays (list columns) as Python's, unicode kept."""
    import math

    import pandas as pd

    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):  # numpy arrays and scalars
            return plain(v.tolist())
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            return None
        return v

    return [{k: plain(v) for k, v in r.items()} for r in rows.to_dict(orient="records")]


def write_table(df, path: Path) -> None:
    """A summary table as ``.json`` (records) or ``.csv``."""
    from ..io import atomic_write_text

    if Path(path).suffix.lower() == ".json":
        atomic_write_text(path, json.dumps(plain_records(df), indent=1, ensure_ascii=False))
    else:
        atomic_write_text(path, df.to_csv(index=False))


def write_rows(rows, out: Path, meta: dict | None = None) -> None:
    """Per-image rows as ``.parquet``, ``.csv``, ``.json`` (records) or ``.jsonl``, by ``out``'s suffix,
    atomically. ``meta`` (provenance: model, checkpoint, transform, version, date, ...) goes into the
    parquet schema metadata (which also marks the file as ours: it is never read back as input) and,
    for every format, into ``<out>.meta.json``."""
    from ..data.records import PARQUET_KEY
    from ..io import atomic_write, atomic_write_text

    fmt = out.suffix.lower()
    if fmt == ".csv":
        atomic_write(out, lambda tmp: rows.to_csv(tmp, index=False))
    elif fmt in (".json", ".jsonl"):
        records = plain_records(rows)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) if fmt == ".jsonl" \
            else json.dumps(records, indent=1, ensure_ascii=False)
        atomic_write_text(out, text)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(rows, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               PARQUET_KEY: json.dumps(meta or {}, ensure_ascii=False).encode()})
        atomic_write(out, lambda tmp: pq.write_table(table, tmp))
    if meta is not None:
        atomic_write_text(out.with_name(out.name + ".meta.json"),
                          json.dumps({**meta, "rows": int(len(rows)), "output": str(out)}, indent=1, ensure_ascii=False))
