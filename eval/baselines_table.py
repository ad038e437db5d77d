"""The paper's classification comparison (SViT Table 7 style) on this machine: every pruning method on
the same packed engine, DeiT-S width, 224 px.

Per method: keep schedule, GFLOPs (multiply-adds, as the paper counts) from the tokens each block actually processed (our FLOP model;
SViT's gates calibrated to their targets and ATS's random queries sharpened to the paper's FLOPs, as
the harness does, since no trained weights can be downloaded here), throughput at each batch size
(interleaved timed rounds, medians, ``nested_svit.benchmark.run_benchmark``), speed-up over dense DeiT-S
and efficiency (speed-up / FLOP-ideal speed-up), and the top-1 the authors report for their released
weights. Top-1 is not measured: there are no ImageNet weights or data on this machine; with them,
``nested-svit eval imagenet --model <name> --checkpoint <release.pth>`` gives it.

Run: ``python eval/baselines_table.py --out eval/results/baselines_cpu`` (about 10 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import pandas as pd
import torch

from nested_svit.benchmark.harness import BenchConfig, run_benchmark
from nested_svit.version import __version__, source_commit

# name -> (method, keep schedule, training per SViT Table 7 / the release, GFLOPs and top-1 reported)
METHODS = {
    "deit_small_patch16_224": ("DeiT-S (dense)", "all 197 tokens", "300 ep", 4.6, 79.8),
    "svit_small": ("SViT", "gates before blocks 3-11, targets 0.7/0.49/0.343 (dynamic)", "30 ep", 3.0, 79.4),
    "dynamicvit_small": ("DynamicViT", "top int(196 rho^s) before blocks 3/6/9, rho 0.7, removed", "30 ep + distill.",
                         2.9, 79.3),
    "evit_small": ("EViT (fuse)", "top ceil(0.7 (N-1)) inside blocks 3/6/9, fused token", "30 ep", 3.0, 79.5),
    "evit_nofuse_small": ("EViT (no fuse)", "top ceil(0.7 (N-1)) inside blocks 3/6/9, removed", "release", 3.0, 79.4),
    "evovit_small": ("Evo-ViT", "top 98 before blocks 4 and 8, preserved, mean-pool head", "300 ep (scratch)",
                     3.0, 79.4),
    "ats_small": ("ATS", "inverse-transform sampling of 196 points inside blocks 3-11 (variable)", "off-the-shelf DeiT-S",
                  3.0, 79.7),
    "tome_small": ("ToMe r=13", "merge 13 per block", "DeiT-S trained with ToMe", 2.7, 79.36),
    "atc_small": ("ATC (average)", "cluster to int(196 0.7^s) inside blocks 3/6/9, size-weighted merge", "30 ep (ATC)",
                  "not recorded here", "not recorded here"),
    "diffrate_small": ("DiffRate 2.9", "json's prune/merge counts in every block (class attention, cosine merge)",
                       "off-the-shelf DeiT-S", 2.9, 79.54),
    "mctf_small": ("MCTF r=16", "fuse 16 per block at the input of blocks 1-11, one-step-ahead attention",
                   "30 ep (MCTF)", 2.6, 80.1),
    "mctf_fast_small": ("MCTF-Fast", "fuse 35% at the input of blocks 3/6/9, one-step-ahead attention",
                        "30 ep (MCTF)", 2.76, "not recorded here"),
}


def _markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="eval/results/baselines_cpu",
                    help="folder for bench.csv (every timed row), table.csv / table.md (the Table 7 layout) and "
                         "run.json (default: %(default)s)")
    ap.add_argument("--batch-sizes", default="1,8,64", help="comma list of batch sizes (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="at least this many interleaved timed rounds per batch size (default: %(default)s)")
    ap.add_argument("--min-time", type=float, default=2.0,
                    help="more rounds at small batches: each model timed for at least this many seconds "
                         "(default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = BenchConfig(models=list(METHODS), batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                      rounds=args.rounds, min_time=args.min_time, threads=args.threads)
    raw = run_benchmark(cfg, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    raw.to_csv(out / "bench.csv", index=False)
    rows = []
    for name, (method, schedule, training, paper_gflops, paper_top1) in METHODS.items():
        mine = raw[raw.model == name]
        row = {"model": name, "method": method, "keep schedule": schedule,
               "GFLOPs (ours, MACs)": round(float(mine.gmacs_per_image.iloc[0]), 2),
               "GFLOPs (paper)": paper_gflops, "training (paper)": training, "top-1 (reported)": paper_top1,
               "top-1 (here)": "not measured: no weights on this machine",
               "ideal speed-up": round(float(mine.ideal_speedup.iloc[0]), 3),
               "calibrated": mine.calibrated_gates.fillna("").iloc[0]}
        for bs in cfg.batch_sizes:
            r = mine[mine.batch_size == bs].iloc[0]
            row[f"img/s @{bs}"] = round(float(r.infer_samples_per_sec), 1)
            row[f"speed-up @{bs}"] = round(float(r.speedup), 3)
            row[f"efficiency @{bs}"] = round(float(r.efficiency), 3)
        rows.append(row)
    table = pd.DataFrame(rows)
    table.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(_markdown(table))
    (out / "run.json").write_text(json.dumps({
        "command": "python " + " ".join(sys.argv), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "nested_svit": __version__, "source_commit": source_commit(),
        "machine": platform.processor() or platform.machine(), "rounds": args.rounds,
        "batch_sizes": cfg.batch_sizes}, indent=1) + "\n")
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
