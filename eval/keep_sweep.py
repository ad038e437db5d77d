"""Accuracy vs speed without retraining: sweep the gate keep budget of the bundled digits SViT.

For each scale s, the gate thresholds are calibrated (``calibrate_keep``, on the train split only) to
``s * [0.7]*3 + [0.49]*3 + [0.343]*3`` (clipped to 1), then the test split is evaluated: top-1, mean
keep fraction, GMACs (multiply-adds) from the actual kept tokens, and throughput (interleaved timed rounds,
medians) against the dense ``vit_digits`` of the same width with the same weights' shape.

Run: ``python eval/keep_sweep.py --out eval/results/keep_sweep`` (a few minutes on 2 CPU cores;
needs ``pip install -e '.[experiment]'``).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from importlib import resources
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from digits_experiment import load_digits  # noqa: E402  (same data and split as the experiment)

from nested_svit import create_model, load_checkpoint  # noqa: E402
from nested_svit.benchmark.flops import flops_per_image  # noqa: E402
from nested_svit.registry import SVIT_KEEP_TARGETS  # noqa: E402

SCALES = (1.43, 1.2, 1.0, 0.8, 0.6, 0.4, 0.2)  # 1.43: the first three gates keep everything


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="eval/results/keep_sweep")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_digits()
    base = create_model("svit_digits")
    load_checkpoint(base, str(resources.files("nested_svit.assets") / "svit_digits.pth"))
    dense = create_model("vit_digits")
    dense.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("gates.")})
    images, labels = test.tensors
    batch = images[:args.batch_size]
    rows = []
    models = {}
    for scale in SCALES:
        model = copy.deepcopy(base).eval()
        targets = [min(1.0, t * scale) for t in SVIT_KEEP_TARGETS]
        reached = model.calibrate_keep(train.tensors[0], targets)
        with torch.inference_mode():
            feats, usage = model.forward_features(images, return_usage=True)
            top1 = float((model.forward_head(feats).argmax(-1) == labels).float().mean() * 100)
        gmacs = float(flops_per_image(model.config, usage.kept, usage.total).mean()) / 2e9  # multiply-adds
        models[scale] = model
        rows.append({"scale": scale, "targets": [round(t, 4) for t in targets],
                     "train_keep_reached": [round(r, 4) for r in reached],
                     "test_keep_mean": float(usage.gate_keep_fraction().mean()), "top1": top1, "gmacs": gmacs})
    dense.eval()
    with torch.inference_mode():
        dense_top1 = float((dense(images).argmax(-1) == labels).float().mean() * 100)
        n = usage.total[:1]
        dense_gmacs = float(flops_per_image(dense.config, n[:, None].expand(-1, 12), n).mean()) / 2e9
        runners = {"dense": dense, **models}
        times = {k: [] for k in runners}
        for m in runners.values():
            m(batch)
        for _ in range(args.rounds):
            for k, m in runners.items():
                t0 = time.perf_counter()
                m(batch)
                times[k].append(time.perf_counter() - t0)
    dense_t = statistics.median(times["dense"])
    for r in rows:
        t = statistics.median(times[r["scale"]])
        r.update({"images_per_sec": args.batch_size / t, "speedup_vs_dense": dense_t / t,
                  "ideal_speedup": dense_gmacs / r["gmacs"]})
    result = {"model": "svit_digits (bundled)", "dense": {"top1": dense_top1, "gmacs": dense_gmacs,
              "images_per_sec": args.batch_size / dense_t, "note": "the SViT's own weights with the gates removed"},
              "batch_size": args.batch_size, "threads": args.threads, "rounds": args.rounds, "rows": rows,
              "torch_version": torch.__version__}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(6.5, 4))
    keep = [r["test_keep_mean"] for r in rows]
    ax1.plot(keep, [r["top1"] for r in rows], "o-", color="tab:blue", label="top-1 (test)")
    ax1.set_xlabel("mean keep fraction of the 9 gates (test)")
    ax1.set_ylabel("top-1 %", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(keep, [r["speedup_vs_dense"] for r in rows], "s--", color="tab:red", label="speed-up vs dense")
    ax2.plot(keep, [r["ideal_speedup"] for r in rows], ":", color="tab:gray", label="FLOP ideal")
    ax2.set_ylabel(f"speed-up vs dense (batch {args.batch_size}, {args.threads} threads)", color="tab:red")
    ax1.set_title("digits SViT: keep budget without retraining")
    fig.legend(loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out / "keep_sweep.png", dpi=120)
    for r in rows:
        print(f"scale {r['scale']:.2f}  keep {r['test_keep_mean']:.3f}  top1 {r['top1']:.2f}  "
              f"speed-up {r['speedup_vs_dense']:.2f} (ideal {r['ideal_speedup']:.2f})")
    print(f"dense top1 {dense_top1:.2f}; wrote {out / 'result.json'} and {out / 'keep_sweep.png'}")


if __name__ == "__main__":
    main()
