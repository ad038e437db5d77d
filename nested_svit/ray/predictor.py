"""The model actor: builds the model once from the run's ``ModelSpec`` (the checkpoint path and settings,
never a model object) and runs each batch with the job's own batch step (``BatchStep.bind``)."""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

from .ledger import begin

FAULT_ENV = "NESTED_SVIT_RAY_FAULT"  # tests: "exit:<batch>:<marker file>" kills the actor once at that batch;
# "sleep:<seconds>:<folder>" makes every batch take that long more, first writing <folder>/started-<batch>
# (a run slow enough to lose a node in, and a sign of which batch is in the actor's hands)


def _maybe_fail(batch: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec.startswith("sleep:"):
        import time

        _, seconds, folder = spec.split(":", 2)
        (Path(folder) / f"started-{batch}").write_text(str(os.getpid()))
        time.sleep(float(seconds))
    if spec.startswith("exit:"):
        _, at, marker = spec.split(":", 2)
        if int(at) == batch and not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)  # the process dies mid-batch, as a lost worker does


class Predictor:
    """``map_batches`` actor. ``step``: the job's batch step without its model (``detached()``);
    ``spec``: the ``ModelSpec`` it is built from (once, on the actor's device); ``threads``: torch threads."""

    def __init__(self, step, spec, threads: int, ledger=None):
        import ray
        import torch

        self.ledger = ledger  # the run's ``Ledger``: this batch's attempts so far travel with its rows
        torch.set_num_threads(max(1, threads))
        device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        built = spec.build(device)  # its notes were shown once, by the driver
        self.step = step.bind(built.model, device, built.reference)

    def __call__(self, rows: dict) -> dict:
        out: dict = {"batch": [], "rows": [], "counts": [], "attempts": []}
        for batch_id, payload in zip(rows["batch"], rows["payload"]):
            out["attempts"].append(begin(self.ledger, "model", int(batch_id)))
            _maybe_fail(int(batch_id))
            frame, counts = self.step.run(self.step.prepare(pickle.loads(payload)))
            buf = io.BytesIO()
            frame.to_parquet(buf, index=False)
            out["batch"].append(int(batch_id))
            out["rows"].append(buf.getvalue())
            out["counts"].append(pickle.dumps(counts))  # the step's counts: the driver adds them up
        return out
