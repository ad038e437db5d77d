"""Row ids of a Hugging Face data set's records (a ``save_to_disk`` folder or parquet shards): the image's
own path where it has one, else where the row is (its shard file and row number)."""
from __future__ import annotations


def row_ids(ds, kind: str, shards: list[str] | None = None) -> list[str]:
    """Row ids: the image struct's ``path`` where the data set has one (unique: a repeated path gets
    ``#<row>``); else ``<shard file>/<row in it>`` for parquet shards, ``<kind>/<row>`` for an Arrow
    folder. Read from the Arrow table and the shards' footers, no image bytes."""
    import pyarrow.compute as pc

    column = ds.data.column("image")
    paths = pc.struct_field(column, "path").to_pylist() if "path" in {f.name for f in column.type} else [None] * len(ds)
    seen: dict[str, int] = {}
    for p in paths:
        if p:
            seen[p] = seen.get(p, 0) + 1
    places = None
    if shards and not all(paths):
        try:
            places = shard_rows(shards)
        except (OSError, ValueError):  # a footer not readable here: row numbers, as datasets reads them
            places = None
    if places is not None and len(places) != len(paths):
        places = None  # the shards' footers do not count the rows the data set holds: row numbers as before
    return [(p if seen[p] == 1 else f"{p}#{i}") if p else (places[i] if places else f"{kind}/{i}")
            for i, p in enumerate(paths)]


def shard_rows(shards: list[str]) -> list[str]:
    """``<shard file name>/<row>`` for every row of the parquet ``shards`` in order (their footers only)."""
    import fsspec
    import pyarrow.parquet as pq

    out: list[str] = []
    for shard in shards:
        with fsspec.open(shard, "rb") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        name = shard.rstrip("/").rsplit("/", 1)[-1]
        out += [f"{name}/{r}" for r in range(rows)]
    return out
