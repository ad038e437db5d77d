"""What ``bench`` writes: its table (``.csv``, or ``.json`` records) and, optionally, its plot of
throughput against batch size (classifiers with the ideal FLOP ratio; detectors FPS^w / FPS^b)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def write_bench(table: pd.DataFrame, out: Path, plot: str | Path | None = None, detectors: bool = False) -> None:
    """``table`` to ``out`` by its suffix; its plot to ``plot`` (None: none)."""
    from ..inference.writers import write_table
    from ..viz import plot_detection_throughput, plot_throughput

    write_table(table, out)
    if plot:
        (plot_detection_throughput if detectors else plot_throughput)(table, plot)
