"""A run, built once (``classifier_job`` / ``detector_job``): its batch step, its data set and the store
of its part files, what its outputs record (``meta``) and what a user should read (``messages``).
``Job.open`` checks the run record and lists the pending batches (once per run); ``Job.run`` runs them
with an engine's schedule (this process's DataLoader by default; the Ray engine's) -> the counts of every
process; ``predict`` runs a job and writes its rows -> a ``PredictSummary``."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from ..distributed import DistInfo, barrier, sum_over_ranks
from .loop import BatchStep, Counts, Schedule, local_schedule, run_batches
from .parts import PartStore
from .scoring import ResolvedScoring
from .spec import BuiltModel, ModelSpec


@dataclass
class Resume:
    """What ``Job.open`` found: images of this process's batches already committed (``done``) and still
    to run (``todo``), and the lines a user should read (a resumed run, an output computed again)."""

    done: int
    todo: int
    notes: list[str] = field(default_factory=list)


@dataclass
class Job:
    """One run over ``dataset``: ``step`` (``ClassifierStep`` / ``DetectorStep``, callbacks set),
    ``store`` (its parts; ``store.out``: the rows' file, None for ``eval``), ``built`` (the model and its
    load report), ``spec`` (what every engine builds the model from), ``meta`` (the outputs' provenance),
    ``scoring`` (classifiers' ``--valid-labels`` / ``--real-labels``), ``pictures``: the picture file name
    of each input id (``--save-vis``; None: no pictures)."""

    step: BatchStep
    dataset: object
    store: PartStore
    built: BuiltModel
    spec: ModelSpec
    workers: int = 2
    dist: DistInfo = field(default_factory=DistInfo)
    meta: dict = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    scoring: ResolvedScoring = field(default_factory=ResolvedScoring)
    pictures: dict[str, str] | None = None
    pictures_dir: Path | None = None
    _todo: list[list[int]] | None = field(default=None, repr=False)  # this process's pending batches, once opened
    _notes: list[str] = field(default_factory=list, repr=False)  # what opening the store said

    @property
    def model(self):
        return self.built.model

    @property
    def device(self):
        return self.step.device

    @property
    def run_record(self) -> dict:
        return self.store.run_record

    def open(self) -> Resume:
        """Check the run record and list this process's pending batches: once per run (a second call
        returns what the first found)."""
        if self._todo is None:
            self._todo, self._notes = self.store.open()
        todo = sum(len(b) for b in self._todo)
        done = sum(len(b) for b in self.store.owned()) - todo
        notes = list(self._notes)
        if done and self.dist.is_main:  # a resumed run says so
            notes.append(f"resuming {self.store.parts_dir}: {done} of {self.store.num_records} images already done, "
                         f"{todo} to go")
        return Resume(done, todo, notes)

    def run(self, progress: Callable[[Counts], None] | None = None, schedule: Schedule | None = None) -> Counts:
        """Run this process's pending batches (``schedule``: an engine's; None: a DataLoader here, the model in
        eval mode), wait for every process -> the counts of this run summed over the processes, ``elapsed``
        the seconds of the whole run."""
        self.open()
        if schedule is None:
            self.model.eval()
            schedule = local_schedule(self.step, self.dataset, self.store, self.workers)
        start = time.perf_counter()
        state = run_batches(self.store, schedule, self.step.counts(), self._todo, progress)
        barrier(self.dist)
        summed = summed_over_ranks(state, self.dist, self.device)
        summed.elapsed = time.perf_counter() - start
        return summed

    def rows(self) -> pd.DataFrame:
        """Every process's rows, merged (the main process, after ``run``)."""
        return self.store.merge()

    def finish(self) -> pd.DataFrame:
        """Write the rows (a file by its suffix, or the data set's summary) with ``meta``, remove the parts."""
        from .pictures import picture_column

        rows = self.store.finish(self.meta, picture_column(self.pictures) if self.pictures else None)
        self._todo = None  # finished: a later run of this job opens its store again (and computes it again)
        return rows


def summed_over_ranks(state: Counts, dist: DistInfo, device) -> Counts:
    """``state`` with its numeric counts (not ``elapsed``) summed over the processes."""
    names = [f.name for f in dataclasses.fields(state) if f.name != "elapsed"
             and isinstance(getattr(state, f.name), (int, float)) and not isinstance(getattr(state, f.name), bool)]
    values = sum_over_ranks([float(getattr(state, n)) for n in names], dist, device)
    return dataclasses.replace(state, **{n: type(getattr(state, n))(v) for n, v in zip(names, values)})


@dataclass
class PredictSummary:
    """What a ``predict`` run did (the main process): its rows, where they went, the images this run
    predicted (every process) in ``seconds``, and its counts (``retried`` batches, ``capacity_reruns``)."""

    rows: pd.DataFrame
    out: str
    counts: Counts
    ignored: list[tuple[str, str]]
    pictures_dir: Path | None = None

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def skipped(self) -> int:
        return int((self.rows["status"] != "ok").sum())

    @property
    def images(self) -> int:
        return int(self.counts.images)

    @property
    def seconds(self) -> float:
        return self.counts.elapsed

    def reasons(self) -> list[str]:
        """The distinct reasons images were skipped."""
        return sorted(set(self.rows.loc[self.rows["status"] != "ok", "error"].astype(str)))


def predict(job: Job, progress: Callable[[Counts], None] | None = None,
            schedule: Schedule | None = None) -> PredictSummary | None:
    """Run ``job`` and write its rows (the main process: ``Job.finish``) -> its summary (None on the other
    processes of a torchrun)."""
    counts = job.run(progress, schedule)
    if not job.dist.is_main:
        return None
    rows = job.finish()
    out = job.store.out if job.store.out is not None else job.store.parts_dir
    return PredictSummary(rows, str(out), counts, list(job.dataset.records.ignored), job.pictures_dir)
