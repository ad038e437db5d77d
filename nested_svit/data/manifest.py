"""Manifests: a ``.csv`` or ``.parquet`` table, local or in object storage, with one row per image. Its
image column (``uri``, or the one ``--uri-column`` names) holds a URI (``s3://b/k.jpg``) or a path
(relative ones: to the manifest's folder); optional ``label`` (class index; empty or -1: none) and
``id`` (default: the image column as written) columns."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .objectstore import is_uri

DEFAULT_COLUMN = "uri"


@dataclass
class ManifestRows:
    sources: list[str]  # URIs or local paths, in the manifest's order
    labels: list[int]
    ids: list[str]
    label_source: str  # manifest_label | none


def _suffix(path: str) -> str:
    return Path(path.rsplit("/", 1)[-1]).suffix.lower()


def manifest_column(path: str, uri_column: str | None) -> str | None:
    """The image column if ``path`` is a manifest (None: it is not one): ``uri_column`` when given, else
    ``uri`` for a ``.csv`` and for a ``.parquet`` without an ``image`` column (that is a Hugging Face shard)."""
    suffix = _suffix(path)
    if suffix not in (".csv", ".parquet"):
        return None
    if uri_column or suffix == ".csv":
        return uri_column or DEFAULT_COLUMN
    import pyarrow.parquet as pq

    from .objectstore import filesystem

    if is_uri(path):
        fs, stripped = filesystem(path)
        with fs.open(stripped, "rb") as f:
            names = pq.read_schema(f).names
    else:
        names = pq.read_schema(path).names
    return DEFAULT_COLUMN if DEFAULT_COLUMN in names and "image" not in names else None


def read_manifest(path: str, column: str) -> ManifestRows:
    """The rows of the manifest at ``path``; a missing column, an empty image cell, labels that are not
    class indices or repeated ids are one-line ValueErrors."""
    import pandas as pd

    from .objectstore import describe_error, filesystem

    try:
        if is_uri(path):
            fs, stripped = filesystem(path)
            with fs.open(stripped, "rb") as f:
                frame = pd.read_csv(f, dtype=str) if _suffix(path) == ".csv" else pd.read_parquet(f)
        else:
            frame = pd.read_csv(path, dtype=str) if _suffix(path) == ".csv" else pd.read_parquet(path)
    except (OSError, ValueError) as e:
        raise ValueError(describe_error(path, e) if is_uri(path) else f"{path}: cannot read the manifest: {e}") from e
    if column not in frame.columns:
        raise ValueError(f"{path}: no column {column!r} (columns: {', '.join(map(str, frame.columns))}); name the "
                         "image column with --uri-column")
    if frame[column].isna().any():
        raise ValueError(f"{path}: column {column!r} is empty in {int(frame[column].isna().sum())} row(s)")
    written = [str(w) for w in frame[column]]
    base = path.rsplit("/", 1)[0] if is_uri(path) else str(Path(path).parent)
    sources = [w if is_uri(w) or Path(w).is_absolute() else f"{base}/{w}" for w in written]
    labels, label_source = [-1] * len(written), "none"
    if "label" in frame.columns:
        cells = frame["label"]
        values = pd.to_numeric(cells, errors="coerce")
        if (values.isna() & cells.notna()).any() or (values.dropna() % 1 != 0).any():
            raise ValueError(f"{path}: column 'label' must hold class indices (integers; empty or -1: none)")
        labels, label_source = [int(v) if v == v else -1 for v in values], "manifest_label"
    ids = [str(i) for i in frame["id"]] if "id" in frame.columns else written
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: ids must be unique ({len(ids) - len(set(ids))} repeated in column "
                         f"{'id' if 'id' in frame.columns else column!r})")
    return ManifestRows(sources, labels, ids, label_source)
