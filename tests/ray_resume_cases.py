"""``predict --engine ray`` when processes die, collected only by tests/test_ray_resume.py, which runs this
file in a pytest process of its own: a model actor killed mid-batch is restarted and its batch retried
with exact output; a driver killed midway (SIGKILL) and rerun with the same ``--out`` resumes without
recomputing the batches it committed, gives the local rows, and a changed input set is refused.

Every driver here is a CLI process of its own, on a cluster this process starts but never joins
(``ray.cluster_utils.Cluster``); no Ray runs in this process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datasets_fixtures import compare_rows, smooth_image, write_image_folder
from procs import cli_command
from nested_svit.cli.main import main

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[test]' brings it)")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

HERE = Path(__file__).parent
TINY = ["--model", "svit_tiny", "--random-weights", "--img-size", "64", "--batch-size", "2"]
LOCAL = ["--workers", "0", "--threads", "2"]


@pytest.fixture
def own_cluster():
    """A head of 4 CPUs this process starts and stops but never joins; no Ray connection of its own."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # an earlier module's connection: closed before this process starts a head
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False,
                                                            "object_store_memory": 256 * 2 ** 20})
    try:
        yield cluster.address
    finally:
        cluster.shutdown()


def test_killed_actor_is_restarted_and_its_batch_retried(tmp_path, own_cluster):
    write_image_folder(tmp_path / "in", per_class=4)
    args = ["predict", *TINY[:-1], "4", "--input", str(tmp_path / "in")]
    assert main([*args, *LOCAL, "--out", str(tmp_path / "local.csv")]) == 0
    marker = tmp_path / "actor-died"
    env = {**os.environ, "NESTED_SVIT_RAY_FAULT": f"exit:1:{marker}"}  # the actor's process exits mid-batch 1
    run = subprocess.run(cli_command(*args, "--engine", "ray", "--ray-address", own_cluster, "--out",
                                     str(tmp_path / "ray.csv")), capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert marker.exists(), "the fault was not injected"
    assert "Ray retried batch 1 (" in run.stdout  # that batch and no other: the summary says it
    local, remote = pd.read_csv(tmp_path / "local.csv"), pd.read_csv(tmp_path / "ray.csv")
    assert len(remote) == 12 and remote["index"].tolist() == list(range(12))
    compare_rows(local, remote)


def test_killed_driver_resumes_without_recomputing_and_refuses_other_inputs(tmp_path, own_cluster, kill_midway):
    data = tmp_path / "in"
    data.mkdir()
    rng = np.random.default_rng(4)
    for i in range(40):
        smooth_image(rng, (80, 64)).save(data / f"{i:03d}.jpg")
    out = tmp_path / "ray.parquet"
    parts = tmp_path / "ray.parquet.parts"
    args = ["predict", *TINY, "--input", str(data), "--out", str(out)]
    # the same actor threads in every run: the same rows
    on_ray = ["--engine", "ray", "--cpus-per-actor", "1", "--ray-address", own_cluster]
    committed = kill_midway(cli_command(*args, *on_ray, "--actors", "1"), parts, 4, timeout=120)
    assert 4 <= len(committed) < 20 and not out.exists(), f"the driver should have been killed midway: {committed}"

    (data / "new.jpg").write_bytes((data / "000.jpg").read_bytes())
    refused = subprocess.run(cli_command(*args, *on_ray), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr  # the input set changed since the parts were written
    assert "partial results of a different run" in refused.stderr
    (data / "new.jpg").unlink()

    record = tmp_path / "batches-run.txt"
    resumed = subprocess.run([sys.executable, str(HERE / "ray_resume_worker.py"), str(record), *args, *on_ray],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ran = [int(b) for b in record.read_text().split()]
    assert sorted(ran) == sorted(set(range(20)) - committed)  # only what was not committed
    assert main([*args[:-1], str(tmp_path / "local.parquet"), *LOCAL]) == 0
    compare_rows(pd.read_parquet(tmp_path / "local.parquet"), pd.read_parquet(out))
