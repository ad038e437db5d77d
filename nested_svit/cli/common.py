"""What every command shares: parsing lists and sizes, checking that outputs can be written, progress
bars, notes. The files themselves are the library's to write (``inference.writers``)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

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
