"""Nothing about an image depends on its batch: the same kept tokens and the same logits, bit for bit, for
an image alone and among 255 others, in fp32 and bf16, exact and capacity forwards, every method.

The reference is the image run alone (a batch of one). Before these rules, bf16 ``auto`` switched to the
padded kernel for many short sequences and fp32's small-M GEMM rounded a lone image's head differently:
this file's first test then found 39 of 64 logits and 1 image's kept tokens different in bf16."""
from __future__ import annotations

import pytest
import torch

from nested_svit.attention import resolve_backend
from nested_svit.layers import Linear
from nested_svit.inference.agreement import agreement, alone, decisions_of
from nested_svit.precision import set_precision
from tests.model_fixtures import lively_model, method_models, one_per_method_fast


def _digits(precision: str, backend: str = "auto", capacity: float = 0.0):
    """The trained digits SViT that ships with the package (its gates have real margins)."""
    from importlib import resources

    from nested_svit.inference import load_model

    model = load_model(str(resources.files("nested_svit.assets") / "svit_digits.pth")).eval()
    set_precision(model, precision)
    return model.set_execution("packed", backend, capacity=capacity)


def _assert_alone_equals_batched(model, images: torch.Tensor) -> None:
    batched, single = decisions_of(model, images), alone(model, images)
    result = agreement(batched, single)
    assert result.tokens > 0 or not model.prunes
    assert result.tokens_equal == result.tokens, f"{result.tokens - result.tokens_equal} kept-token decisions differ"
    assert torch.equal(batched.logits, single.logits), \
        f"{int((batched.logits != single.logits).any(-1).sum())} of {len(images)} images' logits differ"


def _short_sequences(count: int) -> torch.Tensor:
    """Digits-sized images (65 tokens, most gates keeping 20-45): many short sequences."""
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.slow  # ~9 s on an AVX2 CPU (bf16 emulated); the fast tier's bf16 cases below take batches of 64
def test_bf16_image_alone_equals_its_row_in_a_batch_of_256():
    _assert_alone_equals_batched(_digits("bf16"), _short_sequences(256))


@pytest.mark.parametrize("precision, backend, capacity", [
    ("fp32", "auto", 0.0), ("fp32", "padded", 0.0), pytest.param("bf16", "padded", 0.0, marks=pytest.mark.slow),
    pytest.param("bf16", "auto", 1.5, marks=pytest.mark.slow),  # bf16's fast case: every method's test below
    ("fp32", "auto", 1.5)])
def test_image_alone_equals_its_row_in_a_batch(precision, backend, capacity):
    _assert_alone_equals_batched(_digits(precision, backend, capacity), _short_sequences(64))


@pytest.mark.parametrize("name", one_per_method_fast([n for n in method_models() if not n.startswith("deit")]))
def test_every_method_alone_equals_batched_in_bf16(name):
    model = set_precision(lively_model(name), "bf16")
    _assert_alone_equals_batched(model, torch.randn(12, 3, 64, 64, generator=torch.Generator().manual_seed(5)))


def test_padded_backend_pads_each_image_to_its_own_length_with_mixed_resolutions():
    model = set_precision(lively_model("svit_small"), "bf16").set_execution("packed", "padded")
    gen = torch.Generator().manual_seed(2)
    images = [torch.randn(3, s, s, generator=gen) for s in (64, 48, 64, 32, 48)]
    with torch.no_grad():
        feats, usage = model.forward_features(images, return_usage=True)
        logits = model.forward_head(feats)
        for i, image in enumerate(images):
            f1, u1 = model.forward_features([image], return_usage=True)
            assert torch.equal(model.forward_head(f1)[0], logits[i])
            assert torch.equal(u1.kept[0], usage.kept[i])


def test_auto_attention_is_one_backend_for_the_whole_run():
    assert resolve_backend("auto", "cpu", torch.float32) == resolve_backend("auto", "cpu", torch.bfloat16) == "loop"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_linear_row_does_not_depend_on_how_many_rows_it_is_given(dtype):
    """MKL's fp32 GEMM rounds M in {1, 2, 3, 5, 6, 7, 9, 10, 11} differently; ``layers.Linear`` pads them."""
    torch.manual_seed(0)
    for k, n in [(384, 1152), (96, 2), (384, 1000), (64, 10)]:
        lin = Linear(k, n).to(dtype)
        x = torch.randn(64, k).to(dtype)
        with torch.no_grad():
            full = lin(x)
            for rows in range(1, 20):
                assert torch.equal(lin(x[:rows]), full[:rows]), (k, n, rows)
