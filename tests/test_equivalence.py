"""packed (every backend available here) and masked (hard masks) equal the per-image reference."""
from __future__ import annotations

import pytest
import torch
from helpers import install_masks, random_masks, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nested_svit import create_model
from nested_svit.attention import BACKENDS, backend_available
from nested_svit.execution import run_packed

WIDTHS = ["svit_tiny", "svit_small", "svit_base"]  # 3, 6, 12 heads
CPU_BACKENDS = ["auto"] + [b for b in BACKENDS if backend_available(b, "cpu")]
SMALL = dict(img_size=64, depth=4, gate_blocks=(1, 2, 3), keep_targets=(0.7, 0.49, 0.343), num_classes=10)

_models: dict[str, torch.nn.Module] = {}


def small_model(name: str):
    if name not in _models:
        torch.manual_seed(0)
        _models[name] = create_model(name, **SMALL).eval()
    return _models[name]


def assert_all_match_reference(results: dict) -> None:
    ref_feats, ref_usage = results.pop("reference")
    for key, (feats, usage) in results.items():
        assert torch.equal(usage.kept, ref_usage.kept), key
        assert rel_err(feats, ref_feats) <= 1e-5, key


def run_all(model, images):
    """(features, usage) per execution/backend."""
    out = {}
    with torch.no_grad():
        model.set_execution("reference")
        out["reference"] = model.forward_features(images, return_usage=True)
        model.set_execution("masked")
        out["masked"] = model.forward_features(images, return_usage=True)
        for backend in CPU_BACKENDS:
            model.set_execution("packed", backend)
            out[f"packed/{backend}"] = model.forward_features(images, return_usage=True)
    return out


fraction = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(WIDTHS), batch=st.integers(1, 16), seed=st.integers(0, 2**31 - 1),
       data=st.data())
def test_executions_match_reference(name, batch, seed, data):
    model = small_model(name)
    n = model.config.num_tokens
    fractions = [[data.draw(fraction) for _ in range(batch)] for _ in range(model.num_gates)]
    gen = torch.Generator().manual_seed(seed)
    masks = random_masks(gen, [n] * batch, fractions)
    install_masks(model, masks)
    images = torch.randn(batch, 3, 64, 64, generator=gen)
    results = run_all(model, images)
    ref_logits = model.forward_head(results["reference"][0])
    for key, (feats, _) in results.items():
        assert rel_err(model.forward_head(feats), ref_logits) <= 1e-5, key
    assert_all_match_reference(results)


def test_only_class_token_and_everything():
    """Extremes: gates keep only the class token (last gate: nothing) / every token."""
    model = small_model("svit_small")
    batch, n = 5, model.config.num_tokens
    images = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for fill in (False, True):
        install_masks(model, [torch.full((batch * n,), fill) for _ in range(model.num_gates)])
        results = run_all(model, images)
        ref_feats, ref_usage = results.pop("reference")
        expected = n if fill else 1
        assert ref_usage.kept[:, 1:3].eq(expected).all()
        assert ref_usage.kept[:, 3].eq(n if fill else 0).all()  # last gate may prune the class token
        for key, (feats, usage) in results.items():
            assert torch.equal(usage.kept, ref_usage.kept), key
            assert rel_err(feats, ref_feats) <= 1e-5, key


def test_pruned_tokens_preserved_and_reactivated():
    """A token pruned at one block keeps its value there and is updated again when a later gate
    picks it (preserve + reactivate)."""
    model = small_model("svit_tiny")
    n = model.config.num_tokens
    only_cls = torch.arange(n) == 0
    with torch.no_grad():
        x = model.embed(torch.randn(1, 3, 64, 64))
        before = x.values.clone()
        after1 = run_packed(model.blocks[1], x, only_cls, "loop").values.clone()
        after2 = run_packed(model.blocks[2], x, torch.ones(n, dtype=torch.bool), "loop").values
    assert torch.equal(after1[1:], before[1:])  # pruned: preserved exactly
    assert not torch.equal(after1[0], before[0])  # class token processed
    assert (after2[1:] - after1[1:]).abs().amax(1).gt(0).all()  # every pruned token reactivated


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_resolutions_equal_separate_runs(backend):
    """A list of differently sized images runs as one ragged batch and equals one-by-one runs."""
    torch.manual_seed(0)
    model = create_model("svit_tiny", img_size=64, depth=4, gate_blocks=(1, 2, 3),
                         keep_targets=(0.7, 0.49, 0.343), num_classes=10).eval()
    for gate in model.gates:  # larger gate weights: decisions far from the threshold
        torch.nn.init.normal_(gate.mlp.fc2.weight, std=1.0)
    model.set_execution("packed", backend)
    images = [torch.randn(3, 48, 64), torch.randn(3, 64, 64), torch.randn(3, 32, 96), torch.randn(3, 64, 64)]
    with torch.no_grad():
        feats, usage = model.forward_features(images, return_usage=True)
        logits = model.forward_head(feats)
        assert feats.layout.lengths == (13, 17, 13, 17)
        for i, img in enumerate(images):
            f1, u1 = model.forward_features(img.unsqueeze(0), return_usage=True)
            assert torch.equal(u1.kept[0], usage.kept[i])
            assert rel_err(feats.unbind()[i], f1[0]) <= 1e-5
            assert rel_err(logits[i], model.forward_head(f1)[0]) <= 1e-5


def test_nested_backend_under_inference_mode():
    model = small_model("svit_tiny")
    n = model.config.num_tokens
    gen = torch.Generator().manual_seed(3)
    install_masks(model, random_masks(gen, [n] * 4, [[0.5, 0.2, 0.9, 0.0]] * 3))
    images = torch.randn(4, 3, 64, 64, generator=gen)
    with torch.no_grad():
        model.set_execution("reference")
        ref = model(images)
    model.set_execution("packed", "nested")
    with torch.inference_mode():
        out = model(images)
    assert rel_err(out, ref) <= 1e-5


def test_bad_inputs_raise_clear_errors():
    model = small_model("svit_tiny")
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="unknown execution"):
        model.set_execution("fast")
    with pytest.raises(ValueError, match="unknown attention backend"):
        model.set_execution("packed", "magic")
    with pytest.raises(ValueError, match="unknown model"):
        create_model("svit_huge")
    with pytest.raises(ValueError, match="unknown config field"):
        create_model("svit_tiny", keep_rate=0.5)


@pytest.mark.parametrize("name", [*WIDTHS[:2], pytest.param(WIDTHS[2], marks=pytest.mark.slow)])
def test_chunked_mlp_matches_reference(name, monkeypatch):
    """Inference on CPU runs the MLP over row chunks; force several chunks and compare."""
    from nested_svit import layers

    monkeypatch.setattr(layers, "MLP_CHUNK_BYTES", 1)  # -> 256-row chunks
    model = small_model(name)
    batch, n = 40, model.config.num_tokens
    gen = torch.Generator().manual_seed(7)
    install_masks(model, random_masks(gen, [n] * batch, [[0.9] * batch, [0.6] * batch, [0.3] * batch]))
    images = torch.randn(batch, 3, 64, 64, generator=gen)
    assert_all_match_reference(run_all(model, images))
