"""``bench/gpu_check.py --dry-run``: the one-command GPU check runs every step, tiny, on the CPU (the CUDA
tests on the simulated device), writes its CSVs, PNGs and summary, and keeps going past a failing step."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def _run(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *extra], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)


@pytest.mark.slow
def test_dry_run_runs_every_step(tmp_path):
    proc = _run(tmp_path, "--in-process")  # one process start, not seven: the isolation is the next test's
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = summary["steps"]
    assert list(steps) == ["environment", "pytest_cuda", "attention", "syncs", "throughput", "detection",
                           "input_pipeline", "graphs", "precision"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert summary["environment"]["torch"] and summary["environment"]["jpeg_decoder"]
    assert json.loads((tmp_path / "pytest_cuda.json").read_text())["results"]["tests"] >= 1
    attention = pd.read_csv(tmp_path / "attention.csv")
    assert set(attention.backend) >= {"loop", "padded", "nested"}
    tolerance = attention.dtype.map({"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2})
    assert (attention.rel_err < tolerance).all(), attention  # against the fp64 reference
    throughput = pd.read_csv(tmp_path / "throughput.csv")
    assert {"svit_small", "deit_small_patch16_224", "timm/deit_small_patch16_224"} <= set(throughput.model)
    assert set(throughput.precision) == {"fp32", "bf16"}
    assert len(pd.read_csv(tmp_path / "detection.csv")) and len(pd.read_csv(tmp_path / "input_pipeline.csv")) == 2
    assert (tmp_path / "throughput-fp32.png").exists() and (tmp_path / "detection.png").exists()
    graphs = pd.read_csv(tmp_path / "graphs.csv")  # eager / capacity / graphs / compiled, each against eager
    assert set(graphs.variant) == {"eager", "capacity", "graphs", "compiled", "compiled+graphs"}
    assert {"svit_small", "evit_small", "deit_small_patch16_224"} <= set(graphs.model)
    assert graphs.kept_equal.all() and (graphs.max_abs_logit_diff < 1e-4).all() and (graphs.capacity_reruns == 0).all()
    precision = pd.read_csv(tmp_path / "precision.csv")  # bf16 (decisions in fp32) against fp32, batch against alone
    assert set(precision.precision) == {"fp32", "bf16"} and "onnxruntime" in set(precision.runtime)
    ours = precision[precision.runtime == "nested_svit"]
    assert (ours[ours.precision == "bf16"].agree_fp32_kept.dropna() > 0.9).all()
    assert (ours.alone_images_equal.dropna() == 1.0).all() and ours.alone_images_equal.notna().any()
    syncs = json.loads((tmp_path / "syncs.json").read_text())["results"]
    assert syncs["svit_small"]["cpu_ops"] > 0 and "detector_predict_2_images" in syncs
    assert set(summary["goals"]) and all("dry run" in g["status"] for g in summary["goals"].values())
    # where each step's figures come from, and what it could not measure there
    assert steps["pytest_cuda"]["measured_on"] == "simcuda" and "ran 1 of" in steps["pytest_cuda"]["not_measured"][0]
    assert {s["measured_on"] for n, s in steps.items() if n != "pytest_cuda"} == {"cpu"}
    assert all(steps[n]["not_measured"] for n in ("syncs", "throughput", "detection", "input_pipeline", "graphs",
                                                  "precision"))


@pytest.mark.slow
def test_a_failing_step_is_recorded_and_the_next_one_runs(tmp_path):
    proc = _run(tmp_path, "--steps", "attention,environment", env={"GPU_CHECK_FAIL_STEP": "attention"})
    assert proc.returncode == 1
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert steps["attention"]["status"] == "failed" and "injected failure" in steps["attention"]["error"]
    assert steps["environment"]["status"] == "ok"
    assert "Traceback" in json.loads((tmp_path / "attention.json").read_text())["traceback"]
    assert _run(tmp_path, "--steps", "nope").returncode == 2  # unknown steps: refused by the parser


@pytest.mark.slow
def test_each_step_says_where_it_measured_and_what_it_could_not(tmp_path):
    """A step that ran on the CPU says so (``measured_on``) and lists what it could not measure there with
    the reason, instead of a bare ``ok``; no issue numbers in what a user reads."""
    proc = _run(tmp_path, "--steps", "environment,attention", "--in-process")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert steps["attention"]["measured_on"] == "cpu" and steps["environment"]["measured_on"] == "cpu"
    assert any("no GPU" in why for why in steps["attention"]["not_measured"])
    assert "on cpu, 2 not measured" in proc.stdout
    assert "issue" not in proc.stdout.lower() and "issue" not in (tmp_path / "summary.json").read_text().lower()
    assert "issue" not in subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                                         text=True).stdout.lower()
