"""Reduced precision on a trained model: the digits SViT (``nested_svit/assets/svit_digits.pth``, the
calibrated model of ``digits_experiment.py``) on its 360 test images in fp32, bf16 and int8 (the blocks'
linears, and in bf16 the attention, in the reduced precision; every decision in fp32: ``set_precision``), with
the decision agreement of each against fp32 and of every image in a batch of 64 against itself alone.

Run: ``python eval/precision_digits.py --out eval/results/precision-digits`` (under a minute on 2 CPU cores;
needs ``pip install -e '.[experiment]'`` for scikit-learn's digits).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from importlib import resources
from pathlib import Path

import torch

from nested_svit import set_precision
from nested_svit.inference import load_model
from nested_svit.inference.agreement import Agreement, agreement, alone, decisions_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_experiment import load_digits  # noqa: E402  (the experiment's own test split)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="eval/results/precision-digits")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, test = load_digits()
    images, labels = test.tensors
    fp32 = load_model(str(resources.files("nested_svit.assets") / "svit_digits.pth")).eval()
    models = {"fp32": fp32, **{p: set_precision(copy.deepcopy(fp32), p) for p in ("bf16", "int8")}}
    result: dict = {"model": "svit_digits (nested_svit/assets/svit_digits.pth)", "test_images": len(labels),
                    "batch_size": args.batch_size, "threads": args.threads, "torch": torch.__version__}
    versus = {p: Agreement() for p in models if p != "fp32"}
    batch = {p: Agreement() for p in models}
    correct = dict.fromkeys(models, 0)
    for start in range(0, len(labels), args.batch_size):
        x, y = images[start:start + args.batch_size], labels[start:start + args.batch_size]
        runs = {p: decisions_of(model, x) for p, model in models.items()}
        for p, model in models.items():
            correct[p] += int((runs[p].top1 == y).sum())
            batch[p].add(agreement(runs[p], alone(model, x)))
            if p != "fp32":
                versus[p].add(agreement(runs[p], runs["fp32"]))
    result.update({f"top1_{k}": 100 * v / len(labels) for k, v in correct.items()})
    result.update({f"{p}_vs_fp32": a.summary() for p, a in versus.items()})
    result["batch_vs_alone"] = {k: v.summary() for k, v in batch.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
