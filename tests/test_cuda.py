"""CUDA fidelity tests (``pytest -m cuda``): run on a CUDA machine, skipped elsewhere with the reason.
``NESTED_SVIT_TEST_DEVICE=simcuda pytest -m cuda`` runs them on the simulated device (tests/simcuda.py)
to check the tests themselves on a CPU (AMP and NCCL need the real thing).

Tolerances (the GPU is not bitwise the CPU: cuDNN's and TF32's kernels, atomics in ``index_add_``):
* fp32 (TF32 off): packed == reference == one image at a time within 1e-4 relative, identical decisions
  on fixed-mask models (the selections' inputs agree to float rounding);
* bf16 / fp16: logits within 5e-2 of the fp32 CPU run's scale; SViT's gate decisions compared as an
  agreement rate over all tokens (>= 0.97; a near-threshold margin flips in half precision; the
  baselines' top-k on random weights ties too often in half precision for a rate to mean anything);
* detectors: batch == per image with identical decisions and boxes within 1e-3 px in fp32.
"""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch

from model_fixtures import lively_model, method_models
from procs import torchrun_command

pytestmark = pytest.mark.cuda
WANT = os.environ.get("NESTED_SVIT_TEST_DEVICE", "cuda")
METHODS = method_models("small")  # every method of the registry, and dense
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def device():
    if WANT == "simcuda":
        import simcuda

        return simcuda.device()
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False); NESTED_SVIT_TEST_DEVICE=simcuda runs these "
                    "on the simulated device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device("cuda")


def _to_cpu(x):
    if WANT == "simcuda":
        import simcuda

        return simcuda.to_cpu(x)
    return x.cpu() if isinstance(x, torch.Tensor) else x


def _backends(dtype: torch.dtype) -> list[str]:
    return ["auto", "loop", "padded", "nested"] + (["varlen"] if dtype != torch.float32 else [])


@pytest.mark.parametrize("name", METHODS)
def test_classifier_packed_equals_reference_and_single_images(device, name):
    cpu = lively_model(name)
    images = [torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(1)),
              torch.randn(3, 48, 80, generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        expected, cpu_usage = cpu(images), cpu.forward_features(images, return_usage=True)[1]
    model = cpu.to(device)
    on_device = [i.to(device) for i in images]
    for label, dtype in (("fp32", torch.float32), *HALF.items()):
        model.to(dtype)
        x = [i.to(dtype) for i in on_device]
        with torch.no_grad():
            model.set_execution("reference")
            reference = _to_cpu(model(x)).float()
            single = torch.cat([_to_cpu(model([i])).float() for i in x])
            for backend in _backends(dtype):
                model.set_execution("packed", backend)
                feats, usage = model.forward_features(x, return_usage=True)
                got = _to_cpu(model.forward_head(feats)).float()
                if dtype == torch.float32:
                    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4, msg=f"{name} {backend}")
                    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=f"{name} {backend}")
                    assert torch.equal(usage.kept, cpu_usage.kept), backend
                else:
                    scale = expected.abs().max()
                    assert (got - expected).abs().max() <= 5e-2 * scale + 0.2, (name, label, backend)
                    if usage.masks and model.method.calibrate is not None:  # gates: a margin per token
                        agree = np.mean([float((_to_cpu(m).bool() == c.bool()).float().mean())
                                         for m, c in zip(usage.masks, cpu_usage.masks)])
                        assert agree >= 0.97, (name, label, backend, agree)
        if dtype == torch.float32:
            torch.testing.assert_close(single, reference, atol=1e-4, rtol=1e-4)
    model.to(torch.float32)


def test_detector_batch_equals_single_images(device):
    from nested_svit.detection import create_detector

    torch.manual_seed(0)
    det = create_detector("svit_adapter_tiny_maskrcnn", img_scale=(160, 128), num_classes=3).eval().to(device)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), rng.integers(0, 255, (150, 100, 3), dtype=np.uint8)]
    batch = det.predict(images)
    for image, b in zip(images, batch):
        (one,) = det.predict([image])
        assert one.kept.tolist() == b.kept.tolist() and torch.equal(one.labels, b.labels)
        torch.testing.assert_close(one.boxes, b.boxes, atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(one.masks.float().mean(), b.masks.float().mean(), atol=1e-3, rtol=1e-3)


def _cli(*args: str) -> int:
    from nested_svit.cli import main

    return main(list(args))


def test_eval_predict_and_train_end_to_end(device, tmp_path, tiny_detector_file):
    """eval imagenet, eval coco, predict (classifier and detector) and train with --amp + resume, on the
    device, on tiny data."""
    from coco_fixtures import make_coco
    from datasets_fixtures import write_image_folder

    dev = str(device)
    write_image_folder(tmp_path / "val", per_class=2)
    common = ["--model", "svit_tiny", "--random-weights", "--img-size", "64", "--workers", "0", "--device", dev]
    assert _cli("eval", "imagenet", *common, "--data", str(tmp_path / "val"), "--out", str(tmp_path / "r.json")) == 0
    assert _cli("predict", *common, "--input", str(tmp_path / "val"), "--out", str(tmp_path / "p.csv")) == 0
    assert _cli("predict", *common, "--input", str(tmp_path / "val"), "--decode", "gpu",
                "--out", str(tmp_path / "g.csv")) == 0
    import pandas as pd

    cpu_rows, gpu_rows = pd.read_csv(tmp_path / "p.csv"), pd.read_csv(tmp_path / "g.csv")
    assert cpu_rows["id"].tolist() == gpu_rows["id"].tolist() and (gpu_rows["status"] == "ok").all()
    jpeg = gpu_rows["id"].str.endswith(".JPEG")
    assert jpeg.any() and (gpu_rows.loc[jpeg, "decoder"] != "pil").all()  # the device decoder took the JPEGs
    ann, images = make_coco(tmp_path / "coco")
    det = ["--checkpoint", str(tiny_detector_file), "--workers", "0", "--device", dev]
    assert _cli("eval", "coco", *det, "--ann", str(ann), "--images", str(images), "--out", str(tmp_path / "c.json")) == 0
    assert _cli("predict", *det, "--input", str(images), "--out", str(tmp_path / "d.jsonl")) == 0
    train = ["train", "--model", "svit_tiny", "--img-size", "64", "--data", str(tmp_path / "val"), "--batch-size", "2",
             "--workers", "0", "--device", dev, "--out", str(tmp_path / "t.pth")]
    if WANT != "simcuda":
        train.append("--amp")
    assert _cli(*train, "--epochs", "1") == 0
    assert _cli(*train, "--epochs", "2") == 0  # resumed from t.pth on the device
    assert torch.load(tmp_path / "t.pth", weights_only=True)["epoch"] == 2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices for a 2-process NCCL run")
def test_two_process_nccl_training_equals_gloo(tmp_path):
    """tests/parallel_worker.py (a detector epoch, batch 2 over 2 ranks) under torchrun with NCCL on two
    GPUs and with gloo on the CPU: the same steps and weights within GPU float tolerance."""
    from coco_fixtures import make_coco

    ann, images = make_coco(tmp_path / "coco", corrupt=1)
    here = os.path.dirname(__file__)
    results = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / f"{device}.pt"
        env = {**os.environ, "PARALLEL_DEVICE": device, "PYTHONPATH": here, "OMP_NUM_THREADS": "1"}
        subprocess.run(torchrun_command(os.path.join(here, "parallel_worker.py"), str(ann), str(images), str(out)),
                       check=True, env=env, timeout=600)
        results[device] = torch.load(out, weights_only=True)
    assert results["cuda"]["steps"] == results["cpu"]["steps"] and results["cuda"]["skipped"] == results["cpu"]["skipped"]
    for k, v in results["cpu"]["model"].items():
        torch.testing.assert_close(results["cuda"]["model"][k].float(), v.float(), atol=1e-3, rtol=1e-3, msg=k)
