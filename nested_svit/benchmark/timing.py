"""Timing helpers shared by the sweeps and the bench scripts, and the sweeps' progress event."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class BenchProgress:
    """One timed round about to run: of batch size ``batch_size`` (the ``step``-th of ``steps`` such
    rounds in the whole sweep), round ``round`` of ``rounds``; ``runner``: the model (and part) timed
    next, where a round times them one at a time."""

    batch_size: int
    round: int
    rounds: int
    step: int
    steps: int
    runner: str = ""

    def __str__(self) -> str:
        return f"batch {self.batch_size}: round {self.round}/{self.rounds}" + (f" {self.runner}" if self.runner else "")


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000
