"""``predict --engine ray`` against the local ``predict``, in one run, on the same images and model:
whole runs (process start to output written, as a user sees them), interleaved, medians, at two input
sizes; the difference of the two gives the steady rate (images per second once started, what a long
run sees). Ray runs start their own local instance (its start-up is part of the run and is also reported
apart), with CPU actors. Also the decode rate per core, which sizes the decode CPUs a GPU actor needs.

    python bench/ray_engine.py --out bench/results/ray-engine-cpu-<date>.csv
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import input_pipeline as ip  # noqa: E402

from nested_svit.data import EvalTransform  # noqa: E402

CONFIGS = {  # name -> extra predict flags
    "local (2 threads, 2 workers)": ["--threads", "2"],
    "ray, 1 actor x 2 CPUs": ["--engine", "ray", "--actors", "1", "--cpus-per-actor", "2"],
    "ray, 2 actors x 1 CPU": ["--engine", "ray", "--actors", "2", "--cpus-per-actor", "1"],
}
DECODE_CPUS = {  # name -> the CPUs that decode, recorded with every figure (CPU actors decode inside themselves)
    "local (2 threads, 2 workers)": "2 loader workers",
    "ray, 1 actor x 2 CPUs": "in the actor (its 2 CPUs)",
    "ray, 2 actors x 1 CPU": "in each actor (its 1 CPU)",
}


def whole_run(folder: Path, out: Path, model: str, batch: int, extra: list[str]) -> float:
    shutil.rmtree(out.with_name(out.name + ".parts"), ignore_errors=True)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "nested_svit.cli", "predict", "--model", model, "--random-weights", "--input",
           str(folder), "--batch-size", str(batch), "--out", str(out), *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def ray_start_seconds() -> float:
    code = "import time, ray; t = time.perf_counter(); ray.init(address=\"local\", num_cpus=2, include_dashboard=False); " \
           "print(time.perf_counter() - t); ray.shutdown()"
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
                 .stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="128,384", help="two input sizes (images)")
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    small, large = (int(c) for c in args.counts.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    ip.photo_jpegs(tmp / "all", large)
    files = sorted((tmp / "all").glob("*.jpg"))
    folders = {}
    for count in (small, large):
        folders[count] = tmp / f"photos-{count}"
        folders[count].mkdir()
        for f in files[:count]:
            os.link(f, folders[count] / f.name)
    stages = ip.per_image_ms(files[:64], EvalTransform())
    per_core = 1000.0 / (stages["pil_decode_ms"] + stages["pil_crop_ms"])
    print(f"decode + crop: {per_core:.0f} img/s per core", flush=True)
    rows = []
    for r in range(args.rounds):
        for count in (small, large):
            for name, extra in CONFIGS.items():
                seconds = whole_run(folders[count], tmp / "out.parquet", args.model, args.batch_size, extra)
                rows.append({"round": r, "config": name, "images": count, "seconds": seconds,
                             "images_per_sec": count / seconds})
                print(f"round {r} {name}, {count} images: {count / seconds:.2f} img/s ({seconds:.1f} s)", flush=True)
    frame = pd.DataFrame(rows)
    median = frame.groupby(["config", "images"], sort=False)["seconds"].median().unstack()
    summary = pd.DataFrame({f"whole run, {large} images (img/s)": large / median[large],
                            "steady (img/s)": (large - small) / (median[large] - median[small]),
                            "fixed cost (s)": median[small] - small * (median[large] - median[small]) / (large - small)})
    summary = summary.loc[list(CONFIGS)]
    for column in list(summary.columns[:2]):
        summary[column.replace("(img/s)", "vs local")] = summary[column] / summary[column].iloc[0]
    startup = statistics.median(ray_start_seconds() for _ in range(3))
    extra_rows = [{"config": "ray.init, local instance", "seconds": startup},
                  {"config": "decode + crop per core", "images_per_sec": per_core}]
    extra_rows += [{"config": name, "images": "steady", "images_per_sec": summary.loc[name, "steady (img/s)"]}
                   for name in summary.index]
    frame = pd.concat([frame, pd.DataFrame(extra_rows)])
    frame["model"], frame["batch_size"] = args.model, args.batch_size
    frame["decode_cpus"] = frame["config"].map(DECODE_CPUS)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    print(summary.round(3).to_string())
    print(f"ray.init of a local instance: {startup:.1f} s (median of 3); decode + crop {per_core:.0f} img/s per core")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
