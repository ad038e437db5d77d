"""The one inference loop of every engine: a job's batch step (``BatchStep``: prepare a loader batch on
the device, run it -> its rows and counts) and the one commit path (``run_batches``: the pending
batches, listed once when the job opened its store, each batch's part committed, the counts added,
progress reported).

Engines are schedules: ``local_schedule`` runs the step in this process on a DataLoader with a
one-ahead device prefetch (torchrun: this rank's batches); the Ray engine (``nested_svit.ray``) runs
the same step in model actors and hands the driver the same ``BatchResult``s."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol

import pandas as pd
import torch
from torch.utils.data import DataLoader

from ..data.prefetch import prefetched
from ..devices import is_real_cuda
from .parts import PartStore


class Counts(Protocol):
    """What a step counts per batch (``ClassifierCounts``, ``DetectorCounts``): summed with ``add``;
    ``seen``: images predicted or skipped; ``elapsed``: seconds of the run so far; ``retried``: the
    batches of this run that took more than one attempt (set by ``run_batches``)."""

    seen: int
    elapsed: float
    retried: list[int]

    def add(self, other: "Counts") -> None: ...


class BatchStep(Protocol):
    """One job's work on one batch. ``prepare``: a loader batch -> the same on ``device`` (uploaded,
    decoded, normalised); ``run``: a prepared batch -> (its rows, its counts). ``counts()``: zero
    counts of this step's kind; ``bind(model, device, reference)``: the same step on another model and device
    (a Ray actor's; ``reference``: the model in ``--agreement-with``'s precision, or None), ``detached()``:
    the step without its model and callbacks (to ship to one)."""

    device: torch.device

    def prepare(self, batch: dict) -> dict: ...

    def run(self, batch: dict) -> tuple[pd.DataFrame, Counts]: ...

    def counts(self) -> Counts: ...


@dataclass
class BatchResult:
    """A finished global batch: its id, its rows (a frame, or the parquet bytes of one), its counts,
    the attempts it took (more than 1: its work was lost once at least, with a worker or a node)."""

    batch: int
    rows: pd.DataFrame | bytes
    counts: Counts
    attempts: int = 1


Schedule = Callable[[list[list[int]]], Iterable[BatchResult]]


def run_batches(store: PartStore, schedule: Schedule, state: Counts, todo: list[list[int]],
                progress: Callable[[Counts], None] | None = None) -> Counts:
    """Run the pending batches ``todo`` (``store.open()``'s) with ``schedule`` (pending index lists ->
    finished batches, in any order), committing each to ``store`` as it arrives; -> ``state`` with every
    batch's counts added."""
    start = time.perf_counter()
    for result in schedule(todo):
        store.commit(result.batch, result.rows)
        state.add(result.counts)
        if result.attempts > 1:
            state.retried.append(result.batch)
        state.elapsed = time.perf_counter() - start
        if progress:
            progress(state)
    return state


def local_schedule(step: BatchStep, dataset, store: PartStore, workers: int) -> Schedule:
    """The step in this process: a DataLoader over the pending batches (``workers`` decoding
    processes, ``dataset.collate``), each batch prepared one ahead on the step's device."""

    def run(todo: list[list[int]]) -> Iterator[BatchResult]:
        loader = DataLoader(dataset, batch_sampler=todo, num_workers=workers, collate_fn=dataset.collate,
                            persistent_workers=False, pin_memory=is_real_cuda(step.device))
        for batch in prefetched(loader, step.device, step.prepare):
            rows, counts = step.run(batch)
            yield BatchResult(store.batch_of(batch["all_index"]), rows, counts)

    return run
