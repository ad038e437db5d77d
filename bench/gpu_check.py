"""One command for a GPU machine: ``python bench/gpu_check.py --out DIR`` (about 8 minutes on one GPU).

Steps, each in its own process with its own time limit, so one failure (an exception, a CUDA error
that poisons the context, a hang) is recorded and the next step runs:

  environment     torch, CUDA, cuDNN, torchvision, the GPU, kernel availability (flash, varlen, nvjpeg)
  pytest_cuda     ``pytest -m cuda tests/test_cuda.py`` (the CUDA fidelity tests)
  attention       every attention backend x fp32/bf16/fp16 x cuDNN on/off against an fp64 reference
  syncs           host syncs (``torch.cuda.set_sync_debug_mode``) and kernels per forward, each method
  throughput      timm DeiT-S, our DeiT-S, SViT-S and the baselines, batch 1-1024, fp32 + bf16, backends
  detection       FPS^w / FPS^b of ViT-Adapter-S vs SViT-Adapter-S Mask R-CNN at 1333x800, batch 1/2/4/8
  input_pipeline  predict's loop with CPU decode workers vs ``--decode gpu``, against the model alone
  graphs          eager vs capacity forward vs CUDA graphs vs compiled blocks, batch 1-64, dense DeiT-S, SViT-S
                  and EViT-S (fixed counts): images/s, and each variant's logits and kept tokens against eager
  precision       DeiT-S, SViT-S and the baselines in fp32, bf16 and fp16 (decisions in fp32) side by side, with
                  ONNX Runtime's CUDA provider where installed: images/s, decision agreement with fp32 and of each
                  image in its batch against itself alone

DIR gets ``<step>.json`` (status, seconds, results, ``measured_on``: cuda / simcuda / cpu, and
``not_measured``: what the step could not measure there, with the reason), ``<step>.log``, the CSVs and
PNGs, and ``summary.json``: every step's status and the speed goals (bench/README.md), each met / missed /
unknown.
``--dry-run`` runs the same steps tiny on the CPU (the CUDA tests on the simulated device); the test
suite runs it (tests/test_gpu_check.py), so the script cannot rot.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# step -> seconds allowed on a GPU (sum 450 s; with process start-ups about 8 minutes), and in a dry run on a CPU
STEPS = {"environment": (30, 60), "pytest_cuda": (90, 120), "attention": (35, 60), "syncs": (30, 90),
         "throughput": (85, 120), "detection": (60, 120), "input_pipeline": (45, 90), "graphs": (75, 240),
         "precision": (60, 180)}
BASELINES = ["dynamicvit_small", "evit_small", "evovit_small", "ats_small", "tome_small", "atc_small"]


# --------------------------------------------------------------------------- steps (one process each)
def step_environment(ctx: dict) -> dict:
    import torch
    import torchvision

    from nested_svit import __version__
    from nested_svit.devices import kernel_settings

    out = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "nested_svit": __version__, "cuda_available": torch.cuda.is_available(),
           "cpu_count": os.cpu_count(), "kernel_settings": kernel_settings()}
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update({"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "gpu": props.name,
                    "gpu_count": torch.cuda.device_count(), "capability": list(torch.cuda.get_device_capability(0)),
                    "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1),
                    "flash_sdp": torch.backends.cuda.is_flash_attention_available()})
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            out["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out["nvidia_smi"] = None
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401

        out["varlen_attn"] = True
    except ImportError:
        out["varlen_attn"] = False
    out["jpeg_decoder"] = _jpeg_decoder(ctx["device"])
    return out


def _jpeg_decoder(device: str) -> str:
    import io

    import numpy as np
    import torch
    from PIL import Image

    from nested_svit.data.device_decode import DeviceJpegDecoder, _decode_jpeg
    from nested_svit.data.transforms import EvalTransform

    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, format="JPEG")
    decoder = DeviceJpegDecoder(EvalTransform(), device, exif=False)
    _decode_jpeg([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], decoder.decode_on)
    return decoder.name


def step_pytest_cuda(ctx: dict) -> dict:
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rA", "-p", "no:cacheprovider",
           f"--junitxml={ctx['out'] / 'pytest-cuda.xml'}"]
    if ctx["dry_run"]:  # the simulated CUDA device and one test: the step itself is tested here (the
        env["NESTED_SVIT_TEST_DEVICE"] = "simcuda"  # detector and every method on it: tests/test_simcuda.py)
        cmd += ["-k", "deit_small_patch16_224"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (ctx["out"] / "pytest-cuda.txt").write_text(proc.stdout + proc.stderr)
    import re
    import xml.etree.ElementTree as ET

    suite = ET.parse(ctx["out"] / "pytest-cuda.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    deselected = re.search(r"(\d+) deselected", proc.stdout)
    counts["deselected"] = int(deselected.group(1)) if deselected else 0
    if proc.returncode != 0:
        raise RuntimeError(f"pytest -m cuda: {counts}; see pytest-cuda.txt\n" + proc.stdout[-3000:])
    ran = counts["tests"] - counts["skipped"]
    missing = []
    if counts["deselected"] or counts["skipped"]:
        missing.append(f"ran {ran} of {counts['tests'] + counts['deselected']} CUDA tests"
                       + (" (a dry run selects one, on the simulated device)" if ctx["dry_run"] else
                          f" ({counts['skipped']} skipped: see pytest-cuda.txt)"))
    return {**counts, "not_measured": missing}


def step_attention(ctx: dict) -> dict:
    import pandas as pd
    import torch

    from nested_svit.attention import backend_available, set_varlen_kernel, varlen_attention
    from nested_svit.devices import synchronize
    from nested_svit.tokens import Layout

    device, tiny = ctx["device"], ctx["dry_run"]
    gen = torch.Generator().manual_seed(0)
    shapes = {"classifier": (6, 64, [int(x) for x in torch.randint(60, 198, (8 if tiny else 64,), generator=gen)]),
              "detector": (6, 64, [300, 170] if tiny else [4200, 3800, 3400, 4032])}
    rows = []
    for case, (heads, dim, lengths) in shapes.items():
        layout64 = Layout.from_lengths(lengths)
        qkv64 = torch.randn(layout64.total, 3 * heads * dim, generator=gen, dtype=torch.float64)
        reference = varlen_attention(qkv64, heads, layout64, "loop")  # fp64, per image, on the CPU
        layout = Layout.from_lengths(lengths, device)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            qkv = qkv64.to(device, dtype)
            for cudnn in (True, False):
                if not torch.cuda.is_available() and not cudnn:
                    continue  # no cuDNN switch to flip on a CPU
                if torch.cuda.is_available():
                    torch.backends.cuda.enable_cudnn_sdp(cudnn)
                set_varlen_kernel("auto" if cudnn else "flash")
                for backend in ("loop", "padded", "nested", "varlen"):
                    if not backend_available(backend, device, dtype):
                        continue
                    row = {"case": case, "dtype": str(dtype).replace("torch.", ""), "cudnn": cudnn, "backend": backend,
                           "images": len(lengths), "max_len": max(lengths)}
                    try:
                        with torch.no_grad():
                            out = varlen_attention(qkv, heads, layout, backend)
                            times = []
                            for _ in range(3 if tiny else 10):
                                synchronize(device)
                                t = time.perf_counter()
                                varlen_attention(qkv, heads, layout, backend)
                                synchronize(device)
                                times.append(time.perf_counter() - t)
                        err = (out.double().cpu() - reference).abs().max().item()
                        row.update({"max_abs_err": err, "rel_err": err / reference.abs().max().item(),
                                    "ms": statistics.median(times) * 1e3})
                    except Exception as e:  # a kernel refusing an input is a result, not a crash of the step
                        row["error"] = f"{type(e).__name__}: {e}"[:300]
                    rows.append(row)
    set_varlen_kernel("auto")
    frame = pd.DataFrame(rows)
    frame.to_csv(ctx["out"] / "attention.csv", index=False)
    errors = frame["error"].notna().sum() if "error" in frame else 0
    missing = [] if torch.cuda.is_available() else [
        "varlen and jagged CUDA kernels, cuDNN on/off: no GPU (CPU backends only, against fp64)"]
    if tiny:
        missing.append("the detector's long sequences (a dry run uses 300 and 170 tokens)")
    return {"rows": len(frame), "kernel_errors": int(errors), "not_measured": missing,
            "worst_rel_err": {d: float(g["rel_err"].max()) for d, g in frame.groupby("dtype")}}


def step_syncs(ctx: dict) -> dict:
    import warnings

    import torch

    from nested_svit import create_model
    from nested_svit.detection import create_detector

    device, tiny = ctx["device"], ctx["dry_run"]
    real = torch.cuda.is_available()
    dtype = torch.bfloat16 if real else torch.float32
    size = dict(embed_dim=128, num_heads=2, img_size=64) if tiny else {}
    images = torch.randn(8, 3, size.get("img_size", 224), size.get("img_size", 224), device=device, dtype=dtype)

    def measure(fn) -> dict:
        fn()  # warm-up
        counts: dict = {"syncs": None}
        if real:
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts["syncs"] = sum("synchroniz" in str(w.message) for w in caught)
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if real else [])
        with profile(activities=activities) as prof:
            fn()
        events = prof.events()
        counts["kernels"] = sum(1 for e in events if real and e.device_type.name == "CUDA") if real else None
        counts["cpu_ops"] = sum(1 for e in events if e.device_type.name == "CPU" and e.name.startswith("aten::"))
        return counts

    out = {}
    for name in ["deit_small_patch16_224", "svit_small"] + BASELINES:
        model = create_model(name, **size).eval().to(device, dtype)
        with torch.no_grad():
            out[name] = measure(lambda: model(images))
    det = create_detector("svit_adapter_tiny_maskrcnn" if tiny else "svit_adapter_small_maskrcnn",
                          **({"img_scale": (192, 128)} if tiny else {})).eval().to(device)
    shape = (128, 192) if tiny else (800, 1333)
    pictures = [torch.randint(0, 255, (*shape, 3), dtype=torch.uint8).numpy() for _ in range(2)]
    with torch.no_grad():
        out["detector_predict_2_images"] = measure(lambda: det.predict(pictures, masks="rle"))
    if not real:  # host syncs and kernels exist on a GPU only (the simulated device's counts: tests/test_simcuda.py)
        out["not_measured"] = ["host syncs per forward: no GPU (torch.cuda.set_sync_debug_mode)",
                               "CUDA kernels per forward: no GPU (CPU operator counts instead)"]
    return out  # in syncs.json


def step_throughput(ctx: dict) -> dict:
    import pandas as pd

    from nested_svit.benchmark import BenchConfig, run_benchmark
    from nested_svit.viz import plot_throughput

    tiny = ctx["dry_run"]
    batches = [1, 2] if tiny else [1, 4, 16, 64, 256, 1024]
    common = dict(device=ctx["device"], batch_sizes=batches, rounds=1 if tiny else 3, min_time=0.0 if tiny else 0.3,
                  warmup=1 if tiny else 2)
    passes = [("fp32", ["timm/deit_small_patch16_224", "svit_small"] + ([] if tiny else BASELINES), ["auto"]),
              ("bf16", ["timm/deit_small_patch16_224", "svit_small"] + (BASELINES[:1] if tiny else BASELINES), ["auto"]),
              ("bf16", ["svit_small"], ["loop", "padded", "nested"] + ([] if tiny else ["varlen"])),
              ("fp32", ["svit_small"], ["loop", "padded", "nested"])]
    if tiny:
        passes = passes[:3]
    frames = []
    for precision, models, backends in passes:
        frame = run_benchmark(BenchConfig(models=models, precision=precision, backends=backends, **common),
                              progress=lambda m: print(m, flush=True))
        frames.append(frame)
        done = pd.concat(frames, ignore_index=True).drop_duplicates(["model", "backend", "precision", "batch_size"])
        done.to_csv(ctx["out"] / "throughput.csv", index=False)  # what a timeout leaves is kept
    for precision, frame in done.groupby("precision"):
        plot_throughput(frame, ctx["out"] / f"throughput-{precision}.png")
    missing = [] if not tiny else ["batch sizes above 2, the baselines in fp32, the varlen backend, fp32 backends "
                                   "(a dry run times batch 1 and 2 once)"]
    return {"rows": len(done), "not_measured": missing}


def step_detection(ctx: dict) -> dict:
    from nested_svit.benchmark.detection import DetBenchConfig, run_detection_benchmark
    from nested_svit.viz import plot_detection_throughput

    tiny = ctx["dry_run"]
    small = {"models": ["vit_adapter_tiny_maskrcnn", "svit_adapter_tiny_maskrcnn"], "img_scale": (192, 128),
             "shapes": [(128, 192), (192, 128)], "detections": 5}
    cfg = DetBenchConfig(device=ctx["device"], batch_sizes=[1] if tiny else [1, 2, 4, 8], rounds=1 if tiny else 3,
                         **(small if tiny else {"img_scale": (1333, 800)}))
    frame = run_detection_benchmark(cfg, progress=lambda m: print(m, flush=True))
    frame.to_csv(ctx["out"] / "detection.csv", index=False)
    plot_detection_throughput(frame, ctx["out"] / "detection.png")
    missing = ["ViT-Adapter-S / SViT-Adapter-S at 1333x800 (a dry run times the tiny ones at 192x128, batch 1)"] \
        if tiny else []
    return {"rows": len(frame), "not_measured": missing}


def step_input_pipeline(ctx: dict) -> dict:
    import tempfile

    import pandas as pd
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import input_pipeline as ip

    from nested_svit import create_model
    from nested_svit.data import EvalTransform

    device, tiny = ctx["device"], ctx["dry_run"]
    real = torch.cuda.is_available()
    count, batch = (24, 8) if tiny else (1536, 256)
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-jpegs-"))
    ip.photo_jpegs(folder, count)
    model = create_model("deit_small_patch16_224").eval().to(device, torch.bfloat16 if real else torch.float32)
    images = torch.randn(batch, 3, 224, 224, device=device, dtype=model.dtype)
    alone = ip.model_alone(model, images, 3)
    transform = EvalTransform()
    cpu_workers = 0 if tiny else min(12, max(1, (os.cpu_count() or 2) - 2))
    rows = []
    for pipeline, workers in (("uint8", cpu_workers), ("gpu-decode", 0 if tiny else 4)):
        got = ip.predict_loop(model, folder, transform, pipeline, workers, batch, folder / "parts", str(device))
        rows.append({"pipeline": "cpu-decode" if pipeline == "uint8" else pipeline, "workers": workers,
                     "images_per_sec": batch / got["batch_s"], "model_alone_images_per_sec": batch / alone,
                     "fraction_of_model_alone": alone / got["batch_s"], **got})
    pd.DataFrame(rows).to_csv(ctx["out"] / "input_pipeline.csv", index=False)
    missing = [] if real else ["nvjpeg: no GPU (--decode gpu decodes on the CPU with torchvision's libjpeg-turbo here)"]
    return {**{r["pipeline"]: {"images_per_sec": r["images_per_sec"],
                               "fraction_of_model_alone": r["fraction_of_model_alone"]} for r in rows},
            "not_measured": missing}


def step_graphs(ctx: dict) -> dict:
    """The variants of issue 24 side by side, interleaved per batch: ``eager`` (the exact forward: one host
    read per gated block), ``capacity`` (F = 1.25: one read per forward), ``graphs`` (a CUDA graph of the
    capacity forward per batch shape; a dry run replays a make_fx trace instead, which bakes host values in
    as a graph does), ``compiled`` (compiled blocks, exact) and ``compiled+graphs``."""
    import statistics as stats

    import pandas as pd
    import torch

    from nested_svit import create_model
    from nested_svit.devices import seconds_of
    from nested_svit.inference.graphs import GraphedClassifier

    device, tiny = ctx["device"], ctx["dry_run"]
    real = torch.cuda.is_available()
    dtype = torch.bfloat16 if real else torch.float32
    size = dict(embed_dim=128, num_heads=2, img_size=64) if tiny else {}
    side = size.get("img_size", 224)
    batches, calls, rounds = ([1, 2], 2, 1) if tiny else ([1, 4, 16, 64], 10, 3)
    def trace(fn, example, pool=None):  # the CPU's stand-in for a CUDA graph
        from torch.fx.experimental.proxy_tensor import make_fx

        return make_fx(lambda x: fn(x))(example)

    capture = None if real else trace

    rows = []
    for name in ("deit_small_patch16_224", "svit_small", "evit_small"):
        torch.manual_seed(0)
        model = create_model(name, **size).eval().to(device, dtype)
        gen = torch.Generator().manual_seed(1)
        calib = torch.randn(16, 3, side, side, generator=gen).to(device, dtype)
        if model.method.calibrate is not None and model.prunes:
            with torch.no_grad():
                model.calibrate_keep(calib)  # realistic keep counts for random gates
        for batch in batches:
            images = torch.randn(batch, 3, side, side, generator=gen).to(device, dtype)

            def setup(compiled: bool, capacity: bool):
                model.set_execution("packed", "auto", compile=compiled, capacity=1.25 if capacity else 0)

            def plain():
                feats, usage = model.forward_features(images, return_usage=True)
                return model.forward_head(feats), usage

            setup(False, False)
            with torch.no_grad():
                want, want_usage = plain()
            variants = {"eager": (False, False, None), "capacity": (False, True, None),
                        "graphs": (False, True, "graphs"), "compiled": (True, False, None),
                        "compiled+graphs": (True, True, "graphs")}
            for variant, (compiled, capacity, graphs) in variants.items():
                setup(compiled, capacity)
                call = GraphedClassifier(model, capture=capture) if graphs else None
                fn = (lambda: call(images)) if call else plain
                reruns = model.capacity_reruns
                with torch.no_grad():
                    got, usage = fn()  # warm-up: compiles, captures
                    fn()
                    times = [seconds_of(lambda: [fn() for _ in range(calls)], device) / calls for _ in range(rounds)]
                rows.append({"model": name, "variant": variant, "batch_size": batch, "precision": str(dtype)[6:],
                             "images_per_sec": batch / stats.median(times),
                             "max_abs_logit_diff": float((got.float() - want.float()).abs().max()),
                             "kept_equal": bool(torch.equal(usage.kept.cpu(), want_usage.kept.cpu())),
                             "capacity_reruns": model.capacity_reruns - reruns})
                pd.DataFrame(rows).to_csv(ctx["out"] / "graphs.csv", index=False)  # what a timeout leaves is kept
            setup(False, False)
    frame = pd.DataFrame(rows)
    eager = frame[frame.variant == "eager"].set_index(["model", "batch_size"]).images_per_sec
    frame["speedup_vs_eager"] = [r.images_per_sec / eager[(r.model, r.batch_size)] for r in frame.itertuples()]
    frame.to_csv(ctx["out"] / "graphs.csv", index=False)
    missing = [] if real else ["CUDA graphs: no GPU (a make_fx trace replayed instead: right values, no timing "
                               "meaning); batch sizes above 2 (a dry run times batch 1 and 2 once)"]
    best = frame[frame.model == "svit_small"].groupby("variant").speedup_vs_eager.min().round(3).to_dict()
    return {"rows": len(frame), "svit_small_min_speedup_vs_eager": best,
            "all_kept_equal": bool(frame.kept_equal.all()), "not_measured": missing}


# --------------------------------------------------------------------------- the speed goals
def step_precision(ctx: dict) -> dict:
    """Reduced precision with the decisions in fp32 (``set_precision``) against fp32, and batch against alone,
    on the device (``bench`` rows' agreement columns); ONNX Runtime's CUDA provider as the dense peer."""
    from nested_svit.benchmark import BenchConfig, run_benchmark

    tiny = ctx["dry_run"]
    models = ["deit_small_patch16_224", "svit_small"] + (BASELINES[:1] if tiny else BASELINES)
    not_measured = []
    try:
        import onnxruntime as ort

        provider = "CPUExecutionProvider" if tiny else "CUDAExecutionProvider"
        if provider in ort.get_available_providers():
            models.append("onnxruntime/deit_small_patch16_224")
        else:
            not_measured.append(f"ONNX Runtime: no {provider} here (onnxruntime-gpu is not installed)")
    except ImportError:
        not_measured.append("ONNX Runtime: not installed (nested-svit[peers])")
    not_measured.append("TensorRT: not installed here")
    cfg = BenchConfig(models=models, precision="fp32,bf16" if tiny else "fp32,bf16,fp16", device=ctx["device"],
                      batch_sizes=[1, 2] if tiny else [1, 8, 32, 128], rounds=1 if tiny else 3,
                      min_time=0.0 if tiny else 0.3, warmup=1, img_size=64 if tiny else None)
    frame = run_benchmark(cfg, progress=lambda m: print(m, flush=True))
    frame.to_csv(ctx["out"] / "precision.csv", index=False)
    if tiny:
        not_measured.append("fp16 and batch sizes above 2 (a dry run times batch 1 and 2 once, at 64 px)")
    reduced = frame[(frame.precision != "fp32") & (frame.runtime == "nested_svit")]
    return {"rows": len(frame), "min_agree_fp32_kept": float(reduced.agree_fp32_kept.min()),
            "min_alone_images_equal": float(frame.alone_images_equal.min()), "not_measured": not_measured}


def goals(out: Path, dry_run: bool) -> dict:
    """The speed goals (bench/README.md) from the CSVs: ``met`` / ``missed`` with the figure, or ``unknown``."""
    import pandas as pd

    result: dict = {}

    def judge(name: str, value, target: float) -> None:
        result[name] = {"value": None if value is None else round(float(value), 3), "target": target,
                        "status": "unknown" if value is None else ("met" if value >= target else "missed")}

    if (out / "throughput.csv").exists():
        t = pd.read_csv(out / "throughput.csv")
        svit = t[(t.model == "svit_small") & (t.backend == "auto")]
        bf = svit[(svit.precision == "bf16") & (svit.batch_size >= 64)]
        judge("svit_bf16_efficiency_batch_ge_64 (min)", bf.efficiency.min() if len(bf) else None, 0.92)
        judge("svit_over_deit_speedup_from_batch_1 (min)", svit.speedup.min() if len(svit) else None, 1.0)
        ours = t[(t.model == "deit_small_patch16_224")].set_index(["precision", "batch_size"]).infer_samples_per_sec
        timm = t[(t.model == "timm/deit_small_patch16_224")].set_index(["precision", "batch_size"]).infer_samples_per_sec
        both = ours.index.intersection(timm.index)
        judge("our_deit_over_timm (min)", (ours[both] / timm[both]).min() if len(both) else None, 1.0)
    if (out / "detection.csv").exists():
        d = pd.read_csv(out / "detection.csv")
        sv = d[d.model.str.startswith("svit")]
        for part, target in (("backbone", 1.46), ("whole", 1.34)):
            b1 = sv[(sv.part == part) & (sv.batch_size == 1)]
            judge(f"detector_{part}_speedup_batch_1", b1.speedup.iloc[0] if len(b1) else None, target)
    if (out / "input_pipeline.csv").exists():
        p = pd.read_csv(out / "input_pipeline.csv").set_index("pipeline")
        judge("gpu_decode_fraction_of_model_alone",
              p.loc["gpu-decode", "fraction_of_model_alone"] if "gpu-decode" in p.index else None, 0.95)
    if (out / "precision.csv").exists():
        p = pd.read_csv(out / "precision.csv")
        svit = p[(p.model == "svit_small") & (p.precision == "bf16")]
        judge("svit_bf16_kept_token_agreement_with_fp32 (min)", svit.agree_fp32_kept.min() if len(svit) else None,
              0.998)
        ours = p[p.runtime == "nested_svit"].dropna(subset=["alone_images_equal"])
        judge("images_equal_alone_and_in_batch (min)", ours.alone_images_equal.min() if len(ours) else None, 1.0)
    if (out / "graphs.csv").exists():
        g = pd.read_csv(out / "graphs.csv")
        small = g[(g.model == "svit_small") & (g.variant == "graphs") & (g.batch_size <= 16)]
        judge("svit_graphs_over_eager_batch_1_16 (min)", small.speedup_vs_eager.min() if len(small) else None, 1.0)
    if dry_run:
        for g in result.values():
            g["status"] = "dry run (tiny CPU figures: not the goal)"
    return result


# --------------------------------------------------------------------------- driver
def measured_on(name: str, device: str, dry_run: bool) -> str:
    """Where a step's figures come from: ``cuda`` (a GPU), ``simcuda`` (the CUDA tests of a dry run, on the
    simulated device), or ``cpu``."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return "cuda"
    return "simcuda" if name == "pytest_cuda" and dry_run else "cpu"


def run_step(name: str, out: Path, dry_run: bool, device: str) -> int:
    """One step in this process: ``<step>.json`` with its status, seconds and results."""
    start = time.perf_counter()
    ctx = {"out": out, "dry_run": dry_run, "device": device}
    record: dict = {"step": name, "measured_on": measured_on(name, device, dry_run)}
    try:
        if os.environ.get("GPU_CHECK_FAIL_STEP") == name:  # tests/test_gpu_check.py: a step that breaks
            raise RuntimeError("injected failure (GPU_CHECK_FAIL_STEP)")
        results = globals()[f"step_{name}"](ctx)
        record.update(status="ok", not_measured=results.pop("not_measured", []), results=results)
    except Exception as e:
        record.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    record["seconds"] = round(time.perf_counter() - start, 1)
    (out / f"{name}.json").write_text(json.dumps(record, indent=1, default=str))
    return 0 if record["status"] == "ok" else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the results (created)")
    p.add_argument("--dry-run", action="store_true", help="the same steps, tiny, on the CPU")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of: " + ", ".join(STEPS))
    p.add_argument("--in-process", action="store_true",
                   help="run the steps in this process: no isolation and no time limits (the test suite's dry run)")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # one step, in this process (the driver's child)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry_run else "cuda"
    if args.step:
        return run_step(args.step, out, args.dry_run, device)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        p.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device here (torch.cuda.is_available() is False); --dry-run runs the check on the CPU")
    summary: dict = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}}
    total = time.perf_counter()
    for name in steps:
        limit = STEPS[name][1 if args.dry_run else 0]
        (out / f"{name}.json").unlink(missing_ok=True)
        start = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--step", name] + \
              (["--dry-run"] if args.dry_run else [])
        if args.in_process:
            rc = run_step(name, out, args.dry_run, device)
        else:
            with open(out / f"{name}.log", "w") as log:
                try:
                    proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
                    rc = proc.returncode
                except subprocess.TimeoutExpired:
                    rc = None
        seconds = round(time.perf_counter() - start, 1)
        path = out / f"{name}.json"
        if path.exists():
            record = json.loads(path.read_text())
            entry = {"status": record["status"], "seconds": seconds, "measured_on": record.get("measured_on"),
                     "not_measured": record.get("not_measured", []),
                     **({"error": record["error"]} if "error" in record else {})}
        elif rc is None:
            entry = {"status": "timeout", "seconds": seconds, "error": f"over its {limit} s limit; partial files kept"}
        else:
            entry = {"status": "crashed", "seconds": seconds, "error": f"exit code {rc}; see {name}.log"}
        summary["steps"][name] = entry
        where = f"on {entry['measured_on']}" if entry.get("measured_on") else ""
        gaps = f", {len(entry['not_measured'])} not measured" if entry.get("not_measured") else ""
        print(f"{name:15s} {entry['status']:8s} {seconds:6.1f} s  {where}{gaps}  {entry.get('error', '')[:100]}",
              flush=True)
    summary["seconds"] = round(time.perf_counter() - total, 1)
    if (out / "environment.json").exists():
        summary["environment"] = json.loads((out / "environment.json").read_text()).get("results")
    summary["goals"] = goals(out, args.dry_run)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    for name, g in summary["goals"].items():
        print(f"goal {name}: {g['value']} (target {g['target']}): {g['status']}")
    print(f"{sum(e['status'] == 'ok' for e in summary['steps'].values())}/{len(steps)} steps ok in "
          f"{summary['seconds']:.0f} s; results in {out}")
    return 0 if all(e["status"] == "ok" for e in summary["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
