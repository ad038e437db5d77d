"""The capacity forward (``set_execution("packed", capacity=F)``): each gated block runs a fixed number of
rows with no host read. Held against the exact forward (the same kept tokens, logits within fp32
rounding) with a capacity that suffices and one too small on purpose (the batch is rerun), against a
per-image loop, on the simulated CUDA device (one host sync per forward, none and no host copy in the
part a CUDA graph captures), and under a trace that bakes every host value in, as a CUDA graph does:
a trace of one batch replayed on another must still be right (stale offsets or lengths would not be)."""
from __future__ import annotations

import re

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import simcuda
from model_fixtures import lively_model, method_models, one_per_method_fast

pytestmark = pytest.mark.filterwarnings("ignore:is_fx_tracing")


def _images(n: int, seed: int, scale: float = 1.0, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * scale


def _exact(model, images):
    """Logits and kept counts of the exact forward (one read per gated block)."""
    with model.exact_forward(), torch.no_grad():
        feats, usage = model.forward_features(images, return_usage=True)
        return model.forward_head(feats), usage.kept


def _capacity(model, images, factor: float, backend: str = "auto"):
    model.set_execution("packed", backend, capacity=factor)
    try:
        with torch.no_grad():
            feats, usage = model.forward_features(images, return_usage=True)
            return model.forward_head(feats), usage.kept
    finally:
        model.set_execution("packed", "auto", capacity=0)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "padded"])
def test_capacity_equals_the_exact_forward_when_it_suffices(backend):
    model = lively_model("svit_small")
    images = _images(8, 1)
    want, kept = _exact(model, images)
    assert len(set(kept[:, 3:].sum(0).tolist())) > 3  # the gates keep different counts, block to block
    got, got_kept = _capacity(model, images, 2.0, backend)
    assert model.capacity_reruns == 0
    assert torch.equal(got_kept, kept)
    _close(got, want)


def test_a_capacity_too_small_is_found_once_and_the_batch_rerun_exactly():
    model = lively_model("svit_small")
    images = _images(8, 2)
    want, kept = _exact(model, images)
    model.set_execution("packed", capacity=0.3)
    with torch.no_grad():
        logits, got_kept, _, overflow = model.forward_device(images)  # what the cut rows alone give
    assert bool(overflow)
    assert not torch.allclose(logits, want, rtol=1e-3, atol=1e-3)
    model.set_execution("packed", capacity=0)
    got, got_kept = _capacity(model, images, 0.3)
    assert model.capacity_reruns == 1
    assert torch.equal(got_kept, kept)
    _close(got, want)


def test_capacity_on_mixed_resolutions_and_batch_equals_per_image():
    model = lively_model("svit_small", seed=3)
    images = [torch.randn(3, 64, 64), torch.randn(3, 48, 80), torch.randn(3, 32, 32), torch.randn(3, 64, 64)]
    want, kept = _exact(model, images)
    got, got_kept = _capacity(model, images, 1.5)
    assert torch.equal(got_kept, kept)
    _close(got, want)
    singles = torch.cat([_capacity(model, [im], 1.5)[0] for im in images])
    _close(singles, want)


def test_the_capacity_follows_the_calibrated_targets():
    """Calibration runs the exact forward (its shifts are read per gate) and the capacity then sizes each
    block from the calibrated targets, not the config's."""
    model = lively_model("svit_small")
    images = _images(8, 4)
    model.set_execution("packed", capacity=1.3)
    low = [0.3] * model.num_gates
    with torch.no_grad():
        reached = model.calibrate_keep(images, low)
    assert model.keep_targets_in_use == tuple(low)
    assert max(abs(r - 0.3) for r in reached) < 0.05
    model.set_execution("packed", capacity=0)
    want, kept = _exact(model, images)
    got, got_kept = _capacity(model, images, 1.3)
    assert model.capacity_reruns == 0 and torch.equal(got_kept, kept)
    _close(got, want)


@pytest.mark.parametrize("name", one_per_method_fast([n for n in method_models("small") if n != "ats_small"]))
def test_fixed_count_methods_run_in_capacity_mode_unchanged(name):
    model = lively_model(name)
    images = _images(4, 5)
    want, kept = _exact(model, images)
    got, got_kept = _capacity(model, images, 1.2)
    assert torch.equal(got_kept, kept)
    _close(got, want)


def test_refusals_are_one_line():
    model = lively_model("svit_small")
    with pytest.raises(ValueError, match="factor > 0"):
        model.set_execution("packed", capacity=-1)
    with pytest.raises(ValueError, match="finite factor > 0"):
        model.set_execution("packed", capacity=float("inf"))
    with pytest.raises(ValueError, match="'loop'"):
        model.set_execution("packed", "loop", capacity=1.2)
    with pytest.raises(ValueError, match="packed inference execution only"):
        model.set_execution("masked", capacity=1.2)
    with pytest.raises(ValueError, match=r"capacity=F\) first"):
        model.forward_device(_images(2, 0))
    with pytest.raises(ValueError, match="ATS chooses its counts inside the block"):
        lively_model("ats_small").set_execution("packed", capacity=1.2)
    assert model.capacity is None  # a refused call changed nothing


@pytest.fixture(scope="module")
def dev():
    return simcuda.device()


@pytest.mark.parametrize("dtype,backend", [(torch.float32, "auto"), (torch.bfloat16, "varlen")])
def test_one_host_sync_per_forward_on_the_simulated_device(dev, dtype, backend):
    """SViT-S's exact forward reads each gated block's counts (9 syncs); the capacity forward reads once,
    at its end, and its device part (what a CUDA graph captures) reads nothing and copies nothing
    from the host."""
    model = lively_model("svit_small")
    images = _images(8, 1)
    want, kept = _exact(model, images)
    model.to(dev).to(dtype)
    x = simcuda.to_device(images).to(dtype)
    with torch.no_grad(), simcuda.recording() as exact:
        model(x)
    model.set_execution("packed", backend, capacity=1.5)
    with torch.no_grad(), simcuda.recording() as rec:
        feats, usage = model.forward_features(x, return_usage=True)
        logits = model.forward_head(feats)
    with torch.no_grad(), simcuda.recording() as device_part:
        model.forward_device(x)
    model.to(torch.float32).set_execution("packed", "auto", capacity=0)
    assert exact.total_syncs == 9
    assert rec.total_syncs == 1 and rec.violations == [] and rec.mixing == []
    assert device_part.total_syncs == 0 and not device_part.host_copies
    if dtype == torch.float32:
        assert torch.equal(usage.kept, kept)
        _close(simcuda.to_cpu(logits), want)
    else:
        assert rec.kernels["varlen/flash"] == 9  # the varlen kernel's offsets on the device, covering every row
        assert (simcuda.to_cpu(logits).float() - want).abs().max() < 0.5


@pytest.mark.parametrize("name", one_per_method_fast([n for n in method_models("small") if n != "ats_small"]))
def test_every_capturable_forward_reads_nothing_on_the_device(dev, name):
    model = lively_model(name).to(dev).set_execution("packed", capacity=1.5)
    x = simcuda.to_device(_images(4, 6))
    with torch.no_grad(), simcuda.recording() as rec:
        model.forward_device(x)
    assert rec.total_syncs == 0 and not rec.host_copies, (dict(rec.sync_sites), dict(rec.host_copies))


@pytest.mark.slow
def test_a_trace_of_one_batch_replays_right_on_another():
    """make_fx bakes every host value (lengths, maximum lengths, offsets read to the host) into the graph,
    as a CUDA graph bakes kernel arguments. The capacity forward traced on batch A and replayed on batch B
    (other kept counts in most gated blocks) equals B's exact forward; the exact forward, traced the same
    way, does not replay (its sizes are A's)."""
    model = lively_model("svit_small")
    a, b = _images(4, 7), _images(4, 8, scale=2.0)
    want_b, kept_b = _exact(model, b)
    _, kept_a = _exact(model, a)
    assert (kept_a.sum(0) != kept_b.sum(0))[3:].sum() >= 6  # most gated blocks keep another count
    model.set_execution("packed", capacity=2.0)
    with torch.no_grad():
        traced = make_fx(lambda im: model.forward_device(im))(a)
        logits, kept, _, overflow = traced(b)
    assert not bool(overflow) and torch.equal(kept, kept_b)
    _close(logits, want_b)
    model.set_execution("packed", capacity=0)
    with torch.no_grad():
        stale = make_fx(lambda im: model.forward_head(model.forward_features(im)))(a)
        try:
            replayed = stale(b)
        except (IndexError, RuntimeError):
            replayed = None
    assert replayed is None or not torch.allclose(replayed, want_b, rtol=1e-3, atol=1e-3)


def test_shapes_are_static_across_batches():
    """Every op of the capacity forward sees the same shapes for two batches of one size with different kept
    counts (what lets one CUDA graph serve both)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen.append((str(func), tuple(tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out)
                                                  if isinstance(t, torch.Tensor))))
            return out

    model = lively_model("svit_small").set_execution("packed", capacity=2.0)
    with torch.no_grad():  # a first call prepacks the CPU weights once (as a capture's warm-up does)
        model.forward_device(_images(4, 8))
    runs = []
    for seed, scale in ((9, 1.0), (10, 3.0)):
        with torch.no_grad(), Shapes() as mode:
            model.forward_device(_images(4, seed, scale))
        runs.append(mode.seen)
    assert len(runs[0]) > 100 and runs[0] == runs[1]


def _traced_capture(fn, example, pool=None):
    """The CPU's stand-in for ``devices.capture_graph``: a make_fx trace bakes host values in as a graph does."""
    return make_fx(lambda x: fn(x))(example)


@pytest.mark.parametrize("name", [  # all slow (~7 s each): the overflow test below replays a graph fast
    pytest.param("svit_small", marks=pytest.mark.slow), pytest.param("evit_small", marks=pytest.mark.slow),
                                  pytest.param("deit_small_patch16_224", marks=pytest.mark.slow)])
def test_graphed_classifier_replays_one_graph_per_shape_and_equals_exact(name):
    from nested_svit.inference.graphs import GraphedClassifier

    model = lively_model(name)
    graphed = GraphedClassifier(model, max_graphs=2, capture=_traced_capture)
    batches = [_images(4, 11), _images(4, 12, scale=2.0), _images(2, 13), _images(3, 14)]
    with torch.no_grad():
        for images in batches:
            want, kept = _exact(model, images)
            logits, usage = graphed(images)
            assert torch.equal(usage.kept, kept)
            _close(logits, want)
    assert len(graphed.graphs) == 2 and graphed.replays == 3 and graphed.eager_calls == 1
    assert model.capacity_reruns == 0


def test_graphed_classifier_reruns_an_overflowed_batch_exactly():
    from nested_svit.inference.graphs import GraphedClassifier

    model = lively_model("svit_small").set_execution("packed", capacity=0.3)
    graphed = GraphedClassifier(model, capture=_traced_capture)
    images = _images(4, 15)
    want, kept = _exact(model, images)
    with torch.no_grad():
        logits, usage = graphed(images)
    assert model.capacity_reruns == 1 and torch.equal(usage.kept, kept)
    _close(logits, want)


def test_cuda_graphs_are_refused_where_they_cannot_run():
    from nested_svit.inference.graphs import graphs_refusal

    assert "needs a CUDA device, not cpu" in graphs_refusal(lively_model("svit_small"), "cpu")
    with pytest.raises(ValueError, match="need a CUDA device"):
        from nested_svit.devices import capture_graph

        capture_graph(lambda x: x, torch.zeros(2))


@pytest.mark.slow
def test_predict_and_eval_capacity_and_graphs_equal_the_exact_rows(tmp_path, capsys, monkeypatch):
    """End to end: --capacity that suffices, F = 1 (random gates keep more than their targets: the first
    batches rerun, and said; the estimate then follows what they keep), and --cuda-graphs
    (its capture replaced by the trace above: this machine has no GPU) give the exact run's rows and metrics."""
    import json

    import pandas as pd
    from datasets_fixtures import write_image_folder

    from nested_svit.cli import main
    from nested_svit.inference import graphs

    monkeypatch.setattr(graphs, "capture_graph", _traced_capture)
    monkeypatch.setattr(graphs, "graphs_refusal", lambda model, device: None)
    write_image_folder(tmp_path / "val", per_class=3)
    args = ["--model", "svit_tiny", "--random-weights", "--img-size", "64", "--workers", "0", "--batch-size", "4"]
    runs = {"exact": [], "capacity": ["--capacity", "3"], "small": ["--capacity", "1"],
            "graphs": ["--cuda-graphs", "--capacity", "3"]}
    for name, flags in runs.items():
        assert main(["predict", *args, *flags, "--input", str(tmp_path / "val"), "--out", str(tmp_path / f"pred_{name}.csv")]) == 0
        assert main(["eval", "imagenet", *args, *flags, "--data", str(tmp_path / "val"),
                     "--out", str(tmp_path / f"{name}.json")]) == 0
    out = capsys.readouterr().out
    # predict's summary and eval's line each say it
    said = re.findall(r"--capacity 1: (\d+) batch\(es\) rerun \(they kept more", out)
    assert len(said) == 2 and said[0] == said[1] and int(said[0]) >= 1, said
    assert out.count("--capacity 3: 0 batch(es)") == 4
    exact = pd.read_csv(tmp_path / "pred_exact.csv")
    same = [c for c in exact.columns if not c.endswith("_prob")]
    probs = [c for c in exact.columns if c.endswith("_prob")]
    for name in ("capacity", "small", "graphs"):
        got = pd.read_csv(tmp_path / f"pred_{name}.csv")
        pd.testing.assert_frame_equal(exact[same], got[same])  # ids, labels, kept tokens per block
        assert (exact[probs] - got[probs]).abs().max().max() <= 1e-5
    results = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in runs}
    for name in ("capacity", "small", "graphs"):
        for key in ("top1", "top5", "num_images", "mean_keep_ratio", "token_usage_histogram"):
            assert results[name][key] == results["exact"][key], (name, key)
    assert results["small"]["capacity_reruns_this_run"] == int(said[1]) and \
        results["capacity"]["capacity_reruns_this_run"] == 0
    assert "capacity_reruns_this_run" not in results["exact"]
    meta = json.loads((tmp_path / "pred_graphs.csv.meta.json").read_text())
    assert meta["cuda_graphs"] is True and meta["capacity"] == 3


def test_capacity_flags_are_refused_where_they_do_not_apply(tmp_path, capsys, tiny_detector_file):
    from nested_svit.cli import main

    assert main(["predict", "--demo", "--cuda-graphs", "--out", str(tmp_path / "a.csv")]) == 2
    for factor in ("0", "inf", "nan", "-1"):  # 0 is not a silent 'off' on the command line
        assert main(["predict", "--demo", "--capacity", factor, "--out", str(tmp_path / "a.csv")]) == 2
    assert main(["predict", "--demo", "--capacity", "1.2", "--backend", "nested", "--out", str(tmp_path / "a.csv")]) == 2
    assert main(["predict", "--checkpoint", str(tiny_detector_file), "--capacity", "1.2", "--input", str(tmp_path),
                 "--out", str(tmp_path / "d.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--cuda-graphs needs a CUDA device, not cpu" in err and "not 'nested'" in err
    assert "--capacity only applies to classifiers" in err
    assert err.count("--capacity must be a finite factor > 0") == 4 and "Traceback" not in err


def test_the_capacity_follows_what_the_gates_keep():
    """After a batch, each gate's capacity is sized by the largest batch-average keep fraction seen (hand-
    computed here from the kept counts), never below its target: a batch that overflowed at F = 1 fits when
    it comes again, and its values are those of the first run (which was rerun with room for every row)."""
    model = lively_model("svit_small")
    images = _images(8, 3, scale=3.0)  # keeps more than the gates were calibrated to
    model.set_execution("packed", capacity=1.0)
    with torch.no_grad():
        first = model.forward_head(model.forward_features(images))
        assert model.capacity_reruns == 1
        _, usage = model.forward_features(images, return_usage=True)
        assert model.capacity_reruns == 1  # sized by what was seen: no rerun
        second = model.forward_head(model.forward_features(images))
    assert torch.equal(first, second)
    gates, b = model.config.gate_blocks, images.shape[0]
    total = int(usage.total.sum())
    want = []
    for k, block in enumerate(gates):
        protected = 0 if k == len(gates) - 1 else b  # the last gate may prune the class token
        want.append((int(usage.kept[:, block].sum()) - protected) / (total - protected))
    targets = model.keep_targets_in_use
    assert model.observed_keep == pytest.approx(tuple(max(w, t) for w, t in zip(want, targets)))
    assert max(w - t for w, t in zip(want, targets)) > 0.05  # the targets alone would not do


def test_the_command_line_refuses_a_capacity_that_cannot_help(tmp_path, capsys):
    from nested_svit.cli import main

    demo = ["predict", "--demo", "--out", str(tmp_path / "a.csv")]
    assert main([*demo, "--capacity", "0.5"]) == 2
    assert main(["predict", "--model", "deit_tiny_patch16_224", "--random-weights", "--capacity", "1.2", "--input",
                 str(tmp_path), "--out", str(tmp_path / "b.csv")]) == 2
    assert main(["predict", "--model", "evit_small", "--random-weights", "--capacity", "1.2", "--input",
                 str(tmp_path), "--out", str(tmp_path / "c.csv")]) == 2
    err = capsys.readouterr().err
    assert "give F >= 1" in err and "keeps every token" in err and "EViT keeps counts fixed by its config" in err
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 3
