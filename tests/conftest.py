"""Shared test setup: the simulated CUDA device, the two tiers (``slow`` tests run with ``--runslow`` or
``-m slow``), and fixtures several modules use: the CLI and torchrun command lines, a run killed midway,
a tiny detector file."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, os.cpu_count() or 1))

import procs  # noqa: E402
import simcuda  # noqa: E402

pytest_plugins = ["s3_fixtures"]  # the loopback S3 server (fixtures s3_endpoint, s3)

simcuda.register()  # before any test's backward: see simcuda.register


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the slow tier (torchrun matrices, every kill-and-resume variant, the GPU check's "
                          "dry run, long training runs); .ci/run does")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow tier: run with --runslow (or -m slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def torchrun():
    """``torchrun(*args, nproc=2, timeout=600)``: ``procs.run_torchrun``."""
    return procs.run_torchrun


@pytest.fixture
def kill_midway():
    """``kill_midway(cmd, parts, at_least)``: ``procs.kill_midway``."""
    return procs.kill_midway


@pytest.fixture(scope="session")
def tiny_detector_file(tmp_path_factory) -> Path:
    """A random SViT-Adapter-T in our file schema: 2 classes (square, bar), test scale 192x128, gates
    calibrated so that they prune."""
    import numpy as np

    from nested_svit.detection import create_detector
    from nested_svit.detection.checkpoint import save_detector_checkpoint

    torch.manual_seed(0)
    model = create_detector("svit_adapter_tiny_maskrcnn", img_scale=(192, 128), num_classes=2,
                            class_names=("square", "bar"))
    model.calibrate_keep([np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8)] * 2)
    path = tmp_path_factory.mktemp("detector") / "det.pth"
    save_detector_checkpoint(model, path)
    return path


@pytest.fixture(scope="session")
def named_digits(tmp_path_factory) -> Path:
    """The trained digits SViT in our file schema with its class names '0'..'9', as ``train`` writes it."""
    from digits_fixtures import save_named_digits

    return save_named_digits(tmp_path_factory.mktemp("named") / "digits.pth")
