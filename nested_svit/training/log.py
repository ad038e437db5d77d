"""A training run's JSONL log (``<checkpoint stem>.log.jsonl``): one line every ``every`` steps, the
step's log entry as it is. A resumed run first drops the lines of the steps it will do again, so the log
of an interrupted and resumed run is the log of an uninterrupted one. Written by the main process."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path


class StepLogFile:
    """``path``: the log file (None: no log); ``every``: steps between lines."""

    def __init__(self, path: str | Path | None, every: int = 10, is_main: bool = True):
        if every < 1:
            raise ValueError(f"log every {every} steps: give a number >= 1")
        self.path, self.every, self.is_main = (Path(path) if path else None), every, is_main

    @classmethod
    def beside(cls, checkpoint: str | Path | None, every: int = 10, is_main: bool = True) -> "StepLogFile":
        """The log of the run whose checkpoint is ``checkpoint``: ``<checkpoint stem>.log.jsonl``."""
        return cls(Path(checkpoint).with_suffix(".log.jsonl") if checkpoint else None, every, is_main)

    def start(self, global_step: int) -> None:
        """Before training from ``global_step``: drop the lines of later steps (they are redone)."""
        if self.path is None or not self.is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < global_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, entry) -> None:
        """``entry`` (a step's log dataclass) as one line, on every ``every``-th step."""
        if self.path is None or not self.is_main or entry.step % self.every:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(dataclasses.asdict(entry)) + "\n")
