"""A lost node: a Ray cluster of a head and two worker nodes on this machine (``ray.cluster_utils.Cluster``:
separate raylets, object stores and worker processes, on this machine's own address: a driver cannot
join a cluster bound to 127.0.0.1), the command a user runs against a
real cluster (``predict --engine ray --ray-address HOST:PORT``) in its own process, and the worker node
that hosts the model actor killed mid-run: its raylet, object store and workers, without warning. The
run must finish with exactly the local rows, and its summary must name the batches Ray did again."""
from __future__ import annotations

import os
import re
import subprocess
import time

import pandas as pd
import pytest

from datasets_fixtures import write_image_folder
from procs import cli_command
from nested_svit.cli.main import main

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[test]' brings it)")
psutil = pytest.importorskip("psutil", reason="Ray's own dependency")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = ["--model", "svit_tiny", "--random-weights", "--img-size", "64", "--batch-size", "4"]
STORE = 100 * 2 ** 20  # bytes of object store per node


@pytest.fixture
def three_nodes():
    """A head that runs nothing (0 CPUs: every task and actor goes to a worker node) and two worker
    nodes of 1 CPU each: the model actor fills one, the other is where it comes back."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": STORE})
    workers = [cluster.add_node(num_cpus=1, object_store_memory=STORE) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        yield cluster, workers
    finally:
        cluster.shutdown()


def _node_of_the_model_actor(workers, timeout: float = 60):
    """The worker node whose raylet started the model actor's process (Ray names it ``ray::MapWorker(...)``)."""
    raylets = {node.all_processes["raylet"][0].process.pid: node for node in workers}
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in psutil.process_iter(["cmdline"]):
            if "MapWorker" in " ".join(proc.info["cmdline"] or []):
                hosts = [raylets[p.pid] for p in proc.parents() if p.pid in raylets]
                if hosts:
                    return hosts[0]
        time.sleep(0.2)
    raise AssertionError("no model actor process found under a worker node's raylet")


def _batches(parts) -> set[int]:
    return {int(p.stem.split("-")[1]) for p in parts.glob("batch-*.parquet")}


def test_a_lost_worker_node_costs_nothing_but_its_batches(tmp_path, three_nodes):
    cluster, workers = three_nodes
    write_image_folder(tmp_path / "val", per_class=8)  # 24 images, 6 batches
    args = ["predict", *TINY, "--input", str(tmp_path / "val")]
    assert main([*args, "--workers", "0", "--threads", "1", "--out", str(tmp_path / "local.parquet")]) == 0

    out, parts = tmp_path / "ray.parquet", tmp_path / "ray.parquet.parts"
    started = tmp_path / "started"  # the actor writes started-<batch> as it takes a batch, then works 3 s on it
    started.mkdir()
    env = {**os.environ, "NESTED_SVIT_RAY_FAULT": f"sleep:3:{started}"}
    cmd = cli_command(*args, "--engine", "ray", "--ray-address", cluster.address, "--actors", "1",
                      "--cpus-per-actor", "1", "--out", str(out))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180

    def in_hand() -> set[int]:  # the batch the actor started less than 2 s ago (it works 3 s on each, in turn)
        fresh = [p for p in started.iterdir() if time.time() - p.stat().st_mtime < 2]
        return {int(p.name.split("-")[1]) for p in fresh} - _batches(parts)

    victim = None
    while time.time() < deadline and proc.poll() is None:
        if _batches(parts) and in_hand():
            victim = victim or _node_of_the_model_actor(workers)
            committed, working = _batches(parts), in_hand()
            if working:
                break
        time.sleep(0.05)
    assert proc.poll() is None and victim, "the run ended, or committed nothing, before the node was lost"
    cluster.remove_node(victim, allow_graceful=False)  # SIGKILL: raylet, object store, the actor's process
    assert len(committed) < 6, "every batch was committed before the node was lost"

    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    local, remote = pd.read_parquet(tmp_path / "local.parquet"), pd.read_parquet(out)
    assert remote["id"].is_unique and remote["index"].tolist() == list(range(24))
    exact = [c for c in local.columns if not c.endswith("_prob")]
    pd.testing.assert_frame_equal(local[exact], remote[exact])
    pd.testing.assert_frame_equal(local.filter(like="_prob"), remote.filter(like="_prob"), atol=1e-5, rtol=0)

    said = re.search(r"Ray retried batch(?:es)? ([\d, ]+) \(", stdout)
    assert said, stdout
    retried = {int(b) for b in said.group(1).split(",")}
    # the batch the actor was working on, and no batch committed before the loss
    assert working <= retried and not retried & committed, (working, retried, committed)
