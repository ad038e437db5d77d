"""The runtimes a user would pick instead of ours (``benchmark/peers.py``): OpenVINO and ONNX Runtime run our
dense model's weights exported as timm's ViT, and their logits are the model's within the runtime's
tolerance; the bench times them beside ours. The reference is our own dense model in fp32."""
from __future__ import annotations

import builtins

import pytest
import torch

from nested_svit import create_model
from nested_svit.benchmark.peers import peer_runner, split_name, timm_twin

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    model = create_model("vit_digits").eval()
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model, images, model(images)


def test_the_export_source_holds_our_weights_exactly(digits):
    """The same tensors under timm's names; its logits ours within fp32 rounding (its linears run MKL's GEMM,
    ours oneDNN's on prepacked weights)."""
    model, images, want = digits
    twin = timm_twin(model)
    theirs = twin.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(twin(images), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("runtime, precision, tolerance", [
    # OpenVINO's compile takes ~7 s: slow tier with ONNX Runtime's (the harness that times them is there too)
    pytest.param("openvino", "fp32", 1e-5, marks=pytest.mark.slow),
    # ONNX Runtime's export takes ~13 s; the slow tier's bench-with-peers test times it beside ours
    pytest.param("onnxruntime", "fp32", 1e-5, marks=pytest.mark.slow),
    ("openvino", "bf16", 3e-2)])
def test_runtime_logits_are_the_dense_models(digits, runtime, precision, tolerance):
    """f32 within float rounding; bf16 (OpenVINO's INFERENCE_PRECISION_HINT) within bf16's 8 bits, relative
    to the logits' scale; a dynamic batch: any batch size, and an image alone gives its row."""
    model, images, want = digits
    if precision == "bf16":
        import openvino as ov

        if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            pytest.skip("this CPU has no native bf16")
    runner = peer_runner(runtime, model, 32, precision, threads=2)
    got = runner(images)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max() <= tolerance * want.abs().max()
    assert (runner(images[2:3])[0] - got[2]).abs().max() <= tolerance * want.abs().max()


def test_a_missing_runtime_is_one_line_naming_the_extra(digits, monkeypatch):
    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name.startswith("openvino"):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(RuntimeError, match=r"pip install 'nested-svit\[peers\]'"):
        peer_runner("openvino", digits[0], 32, "fp32", 2)


def test_names_and_refusals():
    assert split_name("openvino/deit_small_patch16_224") == ("openvino", "deit_small_patch16_224")
    assert split_name("timm/deit_small_patch16_224") is None and split_name("svit_small") is None
    with pytest.raises(ValueError, match="OpenVINO runs"):
        peer_runner("openvino", create_model("vit_digits"), 32, "fp16", 2)
    with pytest.raises(ValueError, match="prunes tokens"):
        timm_twin(create_model("svit_digits"))


@pytest.mark.parametrize("peers", [
    # OpenVINO's alone, and with ONNX Runtime's runner too (its export takes ~13 s); the fast tier checks
    # each runner's logits (test_runtime_logits_are_the_dense_models), this the bench around them
    pytest.param(["openvino/vit_digits"], marks=pytest.mark.slow),
    pytest.param(["openvino/vit_digits", "onnxruntime/vit_digits"], marks=pytest.mark.slow)])
def test_bench_times_the_peers_beside_ours_with_every_column(tmp_path, peers):
    """One run, two precisions: the peers' rows in the precisions they have, ideal ratios against the fastest
    dense runner of the run, agreement with fp32 for the reduced-precision rows, batch against alone."""
    from nested_svit.benchmark import BenchConfig, run_benchmark

    df = run_benchmark(BenchConfig(models=["svit_digits", *peers],
                                   batch_sizes=[1, 4], precision="fp32,bf16", rounds=1, min_time=0.0, warmup=1,
                                   threads=2))
    from nested_svit.devices import native_bf16

    runners = set(zip(df.runtime, df.model, df.precision))
    assert {("openvino", "openvino/vit_digits", "fp32"), ("nested_svit", "svit_digits", "bf16"),
            ("nested_svit", "vit_digits", "fp32")} <= runners
    assert (("onnxruntime", "onnxruntime/vit_digits", "fp32") in runners) == ("onnxruntime/vit_digits" in peers)
    # OpenVINO's bf16 only where the CPU computes bf16 (elsewhere it would be f32 under another name)
    assert (("openvino", "openvino/vit_digits", "bf16") in runners) == native_bf16("cpu")
    assert ("onnxruntime", "onnxruntime/vit_digits", "bf16") not in runners  # its CPU provider has no bf16
    for bs, rows in df.groupby("batch_size"):
        fastest = rows[rows.ideal_speedup == 1.0].infer_step_time.min()
        assert (rows.speedup_vs_fastest_dense - fastest / rows.infer_step_time).abs().max() < 1e-9
        assert rows.fastest_dense.nunique() == 1
    bf16 = df[df.precision == "bf16"]
    assert bf16.agree_fp32_top1.notna().all()  # peers in fp32 are compared with our fp32 model too
    assert df[(df.precision == "fp32") & (df.runtime == "nested_svit")].agree_fp32_top1.isna().all()
    ours = df[(df.model == "svit_digits") & (df.batch_size == 4)]
    assert (ours.alone_kept == 1.0).all() and (ours.alone_images_equal == 1.0).all()
