"""pytest-benchmark suite: block level and whole model, dense vs the packed backends.

Run: ``pytest bench/ --benchmark-only`` (needs ``pip install -e '.[bench]'``). Not part of the tests.
Compare rows of one run only; the harness (``nested-svit bench``) gives the interleaved batch sweep.
"""
from __future__ import annotations

import pytest
import torch

from nested_svit import create_model
from nested_svit.attention import BACKENDS, DenseContext, backend_available
from nested_svit.execution import run_packed
from nested_svit.tokens import Packed

torch.set_num_threads(2)
CPU_BACKENDS = [b for b in BACKENDS if backend_available(b, "cpu")]
KEEP = 0.5


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    return create_model("deit_small_patch16_224").blocks[5].eval()


def _feature_map(batch: int) -> tuple[Packed, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 197, 384, generator=g)
    keep = torch.rand(batch, 197, generator=g) < torch.linspace(0.3, 0.7, batch)[:, None]  # ragged counts
    keep[:, 0] = True
    return Packed.from_dense(x), keep.flatten()


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_block_dense(benchmark, block, batch):
    x, _ = _feature_map(batch)
    dense = x.to_dense()
    with torch.inference_mode():
        benchmark(lambda: block(dense, DenseContext()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("batch", [1, 8, 32])
def test_block_packed(benchmark, block, batch, backend):
    x, keep = _feature_map(batch)
    with torch.inference_mode():
        benchmark(lambda: run_packed(block, Packed(x.values.clone(), x.layout), keep, backend))


@pytest.mark.parametrize("name,backend", [("deit_small_patch16_224", "auto")] +
                         [("svit_small", b) for b in CPU_BACKENDS])
@pytest.mark.parametrize("batch", [1, 8])
def test_model(benchmark, name, backend, batch):
    torch.manual_seed(0)
    model = create_model(name).eval()
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    if model.num_gates:
        model.calibrate_keep(images)
    model.set_execution("packed", backend)
    with torch.inference_mode():
        benchmark(lambda: model(images))
