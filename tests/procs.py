"""Tests that start processes: the CLI and torchrun command lines, and a run killed midway (SIGKILL, as
a lost machine). ``conftest.py`` hands them out as fixtures."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def cli_command(*args: str) -> list[str]:
    """``nested-svit ARGS`` as a separate process."""
    return [sys.executable, "-m", "nested_svit.cli", *args]


def torchrun_command(*args: str, nproc: int = 2) -> list[str]:
    """``torch.distributed.run --standalone`` of ``args`` (a script, or ``-m nested_svit.cli ...``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


def run_torchrun(*args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """``torchrun_command(*args)`` run to its end, one thread per process, ``tests/`` importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    return subprocess.run(torchrun_command(*args, nproc=nproc), capture_output=True, text=True, env=env, timeout=timeout)


def kill_midway(cmd: list[str], parts: Path, at_least: int, timeout: float = 180, pattern: str = "batch-*.parquet"
                ) -> set[int]:
    """Start ``cmd``, SIGKILL it once ``parts`` holds ``at_least`` part files matching ``pattern`` (or when it
    ended or ``timeout`` passed); -> the ids of the batches it had committed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and len(list(parts.glob(pattern))) < at_least and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return {int(p.stem.split("-")[1]) for p in parts.glob(pattern)}
