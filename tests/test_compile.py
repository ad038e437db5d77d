"""``set_execution("packed", compile=True)``: each block's dense math on the packed rows as compiled
regions with the row count dynamic (attention stays eager). Checked against the eager model: the same
kept tokens and logits within fp32 tolerance, for every method and backend, and no recompilation or
graph break over varied batches after warm-up (dynamo's own counters). Slow tier: the first compile
takes tens of seconds on 2 cores (later processes reuse inductor's cache)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import lively_model, method_models

from nested_svit.attention import BACKENDS, backend_available

pytestmark = pytest.mark.slow


def _pair(name: str, backend: str = "auto"):
    eager = lively_model(name).set_execution("packed", backend)
    compiled = lively_model(name).set_execution("packed", backend, compile=True)
    return eager, compiled


def _run(model, images):
    with torch.no_grad():
        feats, usage = model.forward_features(images, return_usage=True)
        return model.forward_head(feats), usage.kept_after_selection


def _images(batch: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("name", method_models())
def test_compiled_equals_eager_for_every_method(name):
    eager, compiled = _pair(name)
    for seed, batch in enumerate((2, 3, 5)):
        x = _images(batch, seed)
        (want, kept_e), (got, kept_c) = _run(eager, x), _run(compiled, x)
        assert torch.equal(kept_e, kept_c), "token selections differ"
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


@pytest.mark.parametrize("backend", [b for b in BACKENDS if backend_available(b, "cpu")])
def test_compiled_equals_eager_for_every_backend(backend):
    eager, compiled = _pair("svit_small", backend)
    x = _images(4, 11)
    (want, kept_e), (got, kept_c) = _run(eager, x), _run(compiled, x)
    assert torch.equal(kept_e, kept_c)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def test_no_recompiles_and_no_graph_breaks_after_warm_up():
    from torch._dynamo.utils import counters

    eager, compiled = _pair("svit_small")
    for batch in (2, 8):  # warm-up
        _run(compiled, _images(batch, batch))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # the regions before and after attention did compile
    kept_totals = set()
    for i in range(20):
        x = _images(2 + i % 7, 100 + i, scale=0.5 + i / 10)  # batch sizes within the warmed range, keep counts vary
        (want, kept_e), (got, kept_c) = _run(eager, x), _run(compiled, x)
        assert torch.equal(kept_e, kept_c)
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
        kept_totals.add(int(kept_c.sum()))
    assert counters["stats"]["unique_graphs"] == graphs, "a varied batch compiled a new graph"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(kept_totals) >= 10  # the batches did differ in how many tokens each block ran on


def test_compile_refuses_the_other_executions():
    model = lively_model("svit_small")
    with pytest.raises(ValueError, match="packed inference execution only"):
        model.set_execution("masked", compile=True)
    model.set_execution("packed", compile=True).set_execution("reference")
    assert not any(b.compiled for b in model.blocks)


def test_predict_and_eval_compile_equal_eager_rows(tmp_path, capsys):
    import json

    import pandas as pd
    from datasets_fixtures import write_image_folder

    from nested_svit.cli import main

    write_image_folder(tmp_path / "val", per_class=3)
    args = ["--model", "svit_tiny", "--random-weights", "--img-size", "64", "--workers", "0", "--threads", "2",
            "--batch-size", "4"]
    for flags, name in (([], "eager"), (["--compile"], "compiled")):
        assert main(["predict", *args, *flags, "--input", str(tmp_path / "val"), "--out", str(tmp_path / f"{name}.parquet")]) == 0
        assert main(["eval", "imagenet", *args, *flags, "--data", str(tmp_path / "val"),
                     "--out", str(tmp_path / f"{name}.json")]) == 0
    assert "--compile: the blocks' regions compiled in" in capsys.readouterr().err  # timed before any image
    eager, compiled = (pd.read_parquet(tmp_path / f"{n}.parquet") for n in ("eager", "compiled"))
    exact = [c for c in eager.columns if not c.endswith("_prob")]
    pd.testing.assert_frame_equal(eager[exact], compiled[exact])  # ids, labels, kept tokens per block
    probs = [c for c in eager.columns if c.endswith("_prob")]
    assert (eager[probs] - compiled[probs]).abs().max().max() <= 1e-5
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("eager", "compiled"))
    assert (a["compile"], b["compile"]) == (False, True)
    for key in ("top1", "top5", "num_images", "mean_keep_ratio", "token_usage_histogram"):
        assert a[key] == b[key], key


def test_detector_predict_compile_equals_eager(tmp_path, tiny_detector_file):
    import pandas as pd
    from coco_fixtures import make_coco

    from nested_svit.cli import main

    _, images = make_coco(tmp_path / "coco")
    args = ["predict", "--checkpoint", str(tiny_detector_file), "--input", str(images), "--batch-size", "2",
            "--workers", "0", "--threads", "2"]
    assert main([*args, "--out", str(tmp_path / "eager.jsonl")]) == 0
    assert main([*args, "--compile", "--out", str(tmp_path / "compiled.jsonl")]) == 0
    eager, compiled = (pd.read_json(tmp_path / f"{n}.jsonl", lines=True) for n in ("eager", "compiled"))
    assert eager["id"].tolist() == compiled["id"].tolist()
    assert eager["labels"].tolist() == compiled["labels"].tolist()
    for a, b in zip(eager["boxes"], compiled["boxes"]):
        assert np.asarray(a).shape == np.asarray(b).shape and np.allclose(a, b, atol=1e-3)  # boxes rounded to 1e-4 px


def test_bench_compile_adds_compiled_peers_compared_with_compiled_dense():
    from nested_svit.benchmark import BenchConfig, run_benchmark

    cfg = BenchConfig(models=["timm/deit_tiny_patch16_224", "svit_tiny"], batch_sizes=[2, 4], rounds=2, min_time=0.0,
                      warmup=1, img_size=64, compile=True)
    df = run_benchmark(cfg)
    assert len(df) == 2 * 3 * 2  # timm, our dense, svit; eager and compiled; two batch sizes
    assert df.groupby(["model", "compiled"]).size().to_dict() == {(m, c): 2 for m in set(df.model) for c in (False, True)}
    for compiled, group in df.groupby("compiled"):
        dense = group[group.model == "deit_tiny_patch16_224"].set_index("batch_size")
        svit = group[group.model == "svit_tiny"].set_index("batch_size")
        assert (dense.speedup == 1.0).all()  # each dense model is its own compile state's reference
        want = dense.infer_step_time / svit.infer_step_time
        assert svit.speedup.to_numpy() == pytest.approx(want.to_numpy())
        assert (svit.mean_kept_tokens < 17).all()
