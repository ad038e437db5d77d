"""The Ray runs whose processes die (tests/ray_resume_cases.py: a killed model actor, a killed driver's
resume), in a pytest process of their own.

In the slow tier's one long pytest process these scenarios crashed that process with signal 11 inside
Ray's core threads, with no Python frame to show: in CI (exit 139 after 1081 s) and five times here. It
crashed whether the process was the run's driver (the scenario's ``main`` in-process) or only hosted the
cluster for CLI drivers, and whether the actor, the driver or nothing had been killed yet; run in a
fresh process, the same tests passed every time (eight runs). So the slow tier runs them in one."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[test]' brings it)")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

HERE = Path(__file__).parent


def test_killed_actors_and_drivers_in_a_fresh_process():
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--runslow",
                          str(HERE / "ray_resume_cases.py")], capture_output=True, text=True, timeout=1200,
                         cwd=HERE.parent)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert re.search(r"^2 passed in ", run.stdout, re.M), run.stdout[-2000:]  # both scenarios ran, none skipped
