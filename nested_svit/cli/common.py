"""What every command shares: parsing lists and sizes, checking that outputs can be written, writing
tables and rows by file extension (atomically), choosing the device, progress bars, notes."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

PREDICT_FORMATS = (".parquet", ".csv", ".json", ".jsonl")


def csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def int_list(value: str, flag: str = "--batch-sizes") -> list[int]:
    try:
        return [int(v) for v in csv_list(value)]
    except ValueError:
        raise ValueError(f"{flag} {value!r}: give whole numbers separated by commas") from None


def parse_img_scale(value: str | None) -> tuple[int, int] | None:
    """``--img-scale W,H`` (or ``WxH``) -> (W, H); None stays None."""
    if value is None:
        return None
    try:
        w, h = (int(v) for v in value.lower().replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"--img-scale must be W,H (e.g. 1333,800), got {value!r}") from None
    if min(w, h) < 32:
        raise ValueError(f"--img-scale {value}: both sizes must be >= 32")
    return w, h


def keep_budget_values(value: str | None) -> dict:
    """``--keep-targets``: one fraction per gate ("0.7,0.7,...": ``{"targets": (...)}``) or one scale
    factor for the model's own ("0.8": ``{"scale": 0.8}``); not given: ``{}``. The library checks them
    against the model (``methods.svit.keep_budget``)."""
    if value is None:
        return {}
    try:
        values = tuple(float(v) for v in csv_list(value))
    except ValueError:
        raise ValueError(f"--keep-targets {value!r}: give numbers separated by commas") from None
    if not values:
        raise ValueError(f"--keep-targets {value!r}: give numbers separated by commas")
    if len(values) == 1:
        if not values[0] >= 0:
            raise ValueError(f"--keep-targets scale factor must be >= 0, got {value}")
        return {"scale": values[0]}
    return {"targets": values}


def check_writable(out: Path, folder: bool = False) -> None:
    """Fail early when ``out`` cannot be written (read-only folder, a file where a folder must be);
    ``folder``: ``out`` is a folder to write into (a data set output)."""
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"cannot write {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {out}: no write permission in {probe}")
    if out.is_dir() and not folder:
        raise ValueError(f"--out {out} is a folder; give a file name (or end it with / for a Parquet data set)")


def check_suffix(out: Path, allowed: Sequence[str], what: str) -> str:
    """The lower-case suffix of ``out`` if it is one of ``allowed``, else a one-line error."""
    fmt = out.suffix.lower()
    if fmt not in allowed:
        raise ValueError(f"--out {out}: {what} writes {', '.join(allowed)}")
    return fmt


def write_table(df, path: Path) -> None:
    """A summary table as ``.json`` (records) or ``.csv``."""
    from ..io import atomic_write_text

    if path.suffix.lower() == ".json":
        atomic_write_text(path, json.dumps(plain_records(df), indent=1, ensure_ascii=False))
    else:
        atomic_write_text(path, df.to_csv(index=False))


def plain_records(rows) -> list[dict]:
    """Rows as JSON-ready records: floats at full precision (``repr``), missing values as null, numpy
    and pandas scalars as Python's, unicode kept."""
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


def all_skipped(skipped: int, total: int, reasons: list[str] = ()) -> int:
    """The exit status of a run: 2, with one line, when every image was skipped (the rows or the result
    say why for each), else 0."""
    if not total or skipped < total:
        return 0
    why = f" ({'; '.join(reasons[:3])}{' ...' if len(reasons) > 3 else ''})" if reasons else ""
    what = "the one image was skipped" if total == 1 else f"every one of the {total} images was skipped"
    print(f"error: {what}{why}; the outputs give the reason", file=sys.stderr)
    return 2


def capacity_note(factor: float, reruns: int) -> str:
    """What a run's summary line says of ``--capacity F``: how many batches were rerun (with room for every
    row: the same values)."""
    return f"--capacity {factor:g}: {reruns} batch(es) rerun" + \
        (" (they kept more tokens than F x what the gates had kept so far: a larger F makes it rarer)" if reruns else "")


def note(message: str) -> None:
    """A ``note:`` line on stderr, once per run (rank 0 under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {message}", file=sys.stderr)


def warn(message: str) -> None:
    print(message, file=sys.stderr)


def close_bars() -> None:
    """Close open progress bars, so a message starts on its own line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def progress_bar(total: int, label: str, unit: str = "img", enabled: bool = True, initial: int = 0):
    """A tqdm bar on stderr (rank 0): redrawn as it goes on a terminal; into a file or a pipe (a log), a
    line every 30 s at most, and the final one."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=label, unit=unit, file=sys.stderr, disable=not enabled,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)


def picture_names(ids: list[str]) -> dict[str, str]:
    """One PNG file name per input id, never two the same: the id's path with ``/`` as ``__`` and its
    suffix replaced by ``.png``; ids that would share a name (``a.jpg`` / ``a.png``, ``sub/x.jpg`` /
    ``sub__x.jpg``) keep their suffix and, if still shared, get their position in the input."""
    def base(i: str, keep_suffix: bool) -> str:
        p = Path(str(i))
        stem = p.as_posix() if keep_suffix else p.with_suffix("").as_posix()
        return stem.replace("/", "__") + ".png"

    names = {i: base(i, False) for i in ids}
    counts: dict[str, int] = {}
    for n in names.values():
        counts[n] = counts.get(n, 0) + 1
    names = {i: (base(i, True) if counts[n] > 1 else n) for i, n in names.items()}
    seen: dict[str, int] = {}
    for n in names.values():
        seen[n] = seen.get(n, 0) + 1
    return {i: (n if seen[n] == 1 else n[:-4] + f".{k}.png") for k, (i, n) in enumerate(names.items())}
