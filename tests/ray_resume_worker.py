"""``nested-svit ARGS`` as its own Ray driver that also writes, one per line to ``RECORD``, the batches it
handed the cluster: ``python tests/ray_resume_worker.py RECORD ARGS...``. tests/ray_resume_cases.py runs
the resumed run of a killed driver so: every driver of that test is a process of its own (its docstring
says why)."""
from __future__ import annotations

import sys
from pathlib import Path

import nested_svit.ray.engine as engine
from nested_svit.cli.main import main

if __name__ == "__main__":
    record, args = Path(sys.argv[1]), sys.argv[2:]
    real = engine.work_units

    def recording(dataset, batches, batch_size):
        units = real(dataset, batches, batch_size)
        with open(record, "a") as f:
            f.writelines(f"{u['batch']}\n" for u in units)
        return units

    engine.work_units = recording
    sys.exit(main(args))
