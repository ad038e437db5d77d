"""The capacity forward (``set_execution("packed", capacity=F)``) against the exact forward, on this machine.

SViT-S with gates calibrated to the paper's keep targets, synthetic images; for each batch size and F the
exact forward and the capacity forward are timed in interleaved rounds (medians), with the logits'
largest difference, whether the kept counts are equal, and how many forwards were rerun exactly because
their capacity was too small. The capacity forward is built for GPUs (no host read inside the forward, so
it can be captured in a CUDA graph); on a CPU its padded attention over fixed capacities costs time, and
this script records how much.

Run: ``python bench/capacity_forward.py [--out bench/results/capacity-cpu-<date>.csv]``.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from nested_svit import create_model


def _time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,8,16")
    p.add_argument("--factors", default="1.1,1.25,1.5", help="capacity factors F")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / f"capacity-cpu-{datetime.date.today()}.csv"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("svit_small").eval()
    gen = torch.Generator().manual_seed(0)
    model.calibrate_keep(torch.randn(64, 3, 224, 224, generator=gen))
    factors = [float(f) for f in args.factors.split(",")]
    rows = []
    with torch.inference_mode():
        for b in [int(x) for x in args.batch_sizes.split(",")]:
            images = torch.randn(b, 3, 224, 224, generator=gen)
            modes = [0.0] + factors  # 0: the exact forward
            outputs, times = {}, {f: [] for f in modes}
            for f in modes:  # warm-up, and the values compared
                model.set_execution("packed", capacity=f)
                model.capacity_reruns = 0
                outputs[f] = model.forward_features(images, return_usage=True)
            reruns = {f: 0 for f in modes}
            for _ in range(args.rounds):
                for f in modes:
                    model.set_execution("packed", capacity=f)
                    before = model.capacity_reruns
                    times[f].append(_time_once(lambda: model.forward_features(images)))
                    reruns[f] += model.capacity_reruns - before
            exact_ms = statistics.median(times[0.0]) * 1000
            exact_out, exact_usage = outputs[0.0]
            for f in modes:
                out, usage = outputs[f]
                ms = statistics.median(times[f]) * 1000
                rows.append({"batch_size": b, "capacity": f or "exact", "median_ms": round(ms, 2),
                             "images_per_sec": round(b / ms * 1000, 2),
                             "exact_over_this": round(exact_ms / ms, 3),
                             "max_abs_diff": float((out - exact_out).abs().max()),
                             "kept_equal": bool(torch.equal(usage.kept, exact_usage.kept)),
                             "reruns": reruns[f], "forwards": args.rounds, "threads": args.threads})
                print(rows[-1], flush=True)
    model.set_execution("packed", capacity=0)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out_path, index=False)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
