"""Input pipeline against the model, on this machine: can decoding keep up, and what does ``predict``
lose against the model alone?

Measured, in one process, rounds interleaved (the machine's speed drifts by 10-30% between minutes):
* decode + transform images/s: per image in one core (Pillow decode, then the eval crop; torchvision's
  decoder + the device-side crop that ``--decode gpu`` runs), and a DataLoader alone with 0/1/2 workers;
* the model alone: images/s of ``forward_features + forward_head`` on a fixed batch;
* ``predict``'s loop (``Job.run``, as the CLI runs it) per pipeline: where each batch's time goes
  (forward, writing the part, the rest: waiting for the loader, upload/normalise, rows) and its
  steady-state images/s as a fraction of the model alone measured around it.

    python bench/input_pipeline.py --out bench/results/input-pipeline-cpu-<date>.csv
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader

from nested_svit import create_model
from nested_svit.data import EvalTransform, open_dataset
from nested_svit.data.dataset import collate_records
from nested_svit.data.decode import decode_image
from nested_svit.data.device_decode import DeviceJpegDecoder, _decode_jpeg
import nested_svit.inference as inference
from nested_svit.inference.parts import PartStore
from nested_svit.inference.spec import BuiltModel
from nested_svit.devices import synchronize


def photo_jpegs(folder: Path, count: int, size=(500, 375), seed: int = 0) -> None:
    """``count`` photo-like JPEGs (smooth colour fields + grain, quality 90: ~80 KB at 500x375, about
    ImageNet's mean file size and decode cost)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        low = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        arr = np.asarray(low).astype(np.int16) + rng.integers(-20, 20, (size[1], size[0], 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"img{i:05d}.jpg", quality=90)


def per_image_ms(files: list[Path], transform: EvalTransform) -> dict:
    """Core-milliseconds per image of each stage, in this process."""
    datas = [f.read_bytes() for f in files]
    out = {}
    t = time.perf_counter()
    pils = [decode_image(d, exif=True) for d in datas]
    out["pil_decode_ms"] = (time.perf_counter() - t) * 1e3 / len(datas)
    t = time.perf_counter()
    for p in pils:
        transform.crop(p)
    out["pil_crop_ms"] = (time.perf_counter() - t) * 1e3 / len(datas)
    t = time.perf_counter()
    for p in pils:
        transform(p)
    out["pil_crop_float_normalise_ms"] = (time.perf_counter() - t) * 1e3 / len(datas)
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    t = time.perf_counter()
    decoded = _decode_jpeg(tensors, torch.device("cpu"))
    out["torchvision_decode_ms"] = (time.perf_counter() - t) * 1e3 / len(datas)
    t = time.perf_counter()
    for d in decoded:
        transform.crop_tensor(d)
    out["tensor_crop_ms"] = (time.perf_counter() - t) * 1e3 / len(datas)
    return out


def loader_rate(folder: Path, transform: EvalTransform, workers: int, batch: int) -> float:
    ds = open_dataset(folder, transform.crop, exif=True)
    batches = [list(range(i, min(i + batch, len(ds)))) for i in range(0, len(ds), batch)]
    loader = DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=collate_records)
    it = iter(loader)
    next(it)  # workers started, first batch: not counted
    t, n = time.perf_counter(), 0
    for b in it:
        n += len(b["all_index"])
    return n / (time.perf_counter() - t)


def model_alone(model, images: torch.Tensor, n: int) -> float:
    """Median seconds of one batch, the model alone (``images`` on the model's device, in its dtype)."""
    times = []
    with torch.no_grad():
        for _ in range(n):
            synchronize(images.device)
            t = time.perf_counter()
            model.forward_head(model.forward_features(images))
            synchronize(images.device)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def predict_loop(model, folder: Path, transform: EvalTransform, pipeline: str, workers: int, batch: int,
                 parts: Path, device: str = "cpu") -> dict:
    """``Job.run`` as ``predict`` runs it; seconds per batch in steady state (first batch out) and
    its parts. ``pipeline``: float (normalised float batches from the workers: before), uint8 (crops
    from the workers, normalised by the model's device), gpu-decode (``--decode gpu``'s code path)."""
    if pipeline == "float":
        ds, extra = open_dataset(folder, transform, exif=True), {}
    else:
        ds = open_dataset(folder, transform.crop, exif=True, encoded_jpegs=pipeline == "gpu-decode")
        extra = {"transform": transform}
        if pipeline == "gpu-decode":
            extra["decoder"] = DeviceJpegDecoder(transform, device, exif=True)
    shutil.rmtree(parts, ignore_errors=True)
    step = inference.ClassifierStep(model, torch.device(device), 5, exif=True, **extra)
    job = inference.Job(step, ds, PartStore(parts, {"bench": pipeline}, batch, len(ds)),
                        BuiltModel(model, None), inference.ModelSpec("classifier"), workers)
    forward, writing, stamps = [], [], []
    plain_forward, plain_write = model.forward_features, PartStore.commit

    def timed_forward(*a, **k):
        synchronize(device)
        t = time.perf_counter()
        out = plain_forward(*a, **k)
        synchronize(device)
        forward.append(time.perf_counter() - t)
        return out

    def timed_write(*a, **k):
        t = time.perf_counter()
        plain_write(*a, **k)
        writing.append(time.perf_counter() - t)

    model.forward_features, PartStore.commit = timed_forward, timed_write
    try:
        job.run(lambda s: stamps.append(time.perf_counter()))
    finally:
        del model.forward_features
        PartStore.commit = plain_write
    steady = [b - a for a, b in zip(stamps, stamps[1:])]
    per_batch = statistics.median(steady)
    fwd, write = statistics.median(forward[1:]), statistics.median(writing[1:])
    return {"batch_s": per_batch, "forward_s": fwd, "write_s": write, "rest_s": per_batch - fwd - write}


def whole_run(folder: Path, args, out: Path) -> dict:
    """``nested-svit predict`` in this process, start to end (workers started, first batch, warm-up,
    merge and output included): seconds per batch of images."""
    from nested_svit.cli.main import main as cli

    shutil.rmtree(out.with_name(out.name + ".parts"), ignore_errors=True)
    count = len(list(folder.glob("*.jpg")))
    t = time.perf_counter()
    assert cli(["predict", "--model", args.model, "--random-weights", "--input", str(folder), "--batch-size",
                str(args.batch_size), "--threads", str(args.threads), "--out", str(out)]) == 0
    return {"batch_s": (time.perf_counter() - t) * args.batch_size / count}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=None, help="a folder of JPEGs (default: 256 generated 500x375 photos)")
    p.add_argument("--count", type=int, default=256)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--pipelines", default="float,uint8,gpu-decode")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="input-bench-"))
    folder = Path(args.images) if args.images else tmp / "photos"
    if not args.images:
        photo_jpegs(folder, args.count)
    transform = EvalTransform()
    rows = []
    stages = per_image_ms(sorted(folder.glob("*.jpg"))[:64], transform)
    print("per image, one core:", {k: round(v, 2) for k, v in stages.items()}, flush=True)
    rows.append({"section": "per-image core ms", **stages})
    for w in map(int, args.workers.split(",")):
        rate = loader_rate(folder, transform, w, args.batch_size)
        print(f"loader alone, {w} workers: {rate:.0f} img/s", flush=True)
        rows.append({"section": "loader alone", "workers": w, "images_per_sec": rate})
    model = create_model(args.model).eval()
    images = torch.randn(args.batch_size, 3, 224, 224)
    model_alone(model, images, 1)
    configs = [(pl, w) for pl in args.pipelines.split(",") for w in map(int, args.workers.split(","))
               if pl != "gpu-decode" or w == 1] + [("cli", 2)]  # gpu-decode: the workers only read bytes
    for r in range(args.rounds):
        for pipeline, w in configs:
            before = model_alone(model, images, 2)
            if pipeline == "cli":
                got = whole_run(folder, args, tmp / "cli.parquet")
            else:
                got = predict_loop(model, folder, transform, pipeline, w, args.batch_size, tmp / "parts")
            after = model_alone(model, images, 2)
            alone = (before + after) / 2
            row = {"section": "predict", "round": r, "pipeline": pipeline, "workers": w,
                   "model_alone_batch_s": alone, **got,
                   "images_per_sec": args.batch_size / got["batch_s"],
                   "model_alone_images_per_sec": args.batch_size / alone,
                   "fraction_of_model_alone": alone / got["batch_s"],
                   "forward_slowdown": got["forward_s"] / alone if "forward_s" in got else None}
            rows.append(row)
            parts = (f" (forward {got['forward_s']:.3f}s vs alone {alone:.3f}s, write {got['write_s'] * 1e3:.0f} ms, "
                     f"rest {got['rest_s'] * 1e3:.0f} ms)") if "forward_s" in got else " (whole run)"
            print(f"round {r} {pipeline:10s} workers {w}: {row['fraction_of_model_alone']:.3f} of the model alone"
                  + parts, flush=True)
    frame = pd.DataFrame(rows)
    frame["threads"], frame["batch_size"], frame["model"] = args.threads, args.batch_size, args.model
    frame["torch_version"] = torch.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    summary = frame[frame.section == "predict"].groupby(["pipeline", "workers"])[
        ["fraction_of_model_alone", "forward_slowdown", "write_s", "rest_s", "images_per_sec",
         "model_alone_images_per_sec"]].median()
    print(summary.to_string())
    summary.to_csv(Path(args.out).with_suffix(".summary.csv"))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
