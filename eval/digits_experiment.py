"""End-to-end SViT recipe on a real data set that ships inside a PyPI package (scikit-learn's digits).

1. Train a small dense ViT (12 blocks, C=64, patch 4 on digits upsampled to 32x32: 65 tokens).
2. Fine-tune SViT gates from it (gates before blocks 4..12, targets [0.7]*3+[0.49]*3+[0.343]*3,
   straight-through Gumbel masks, masked execution, dynamic keep-ratio loss, lambda 4).
3. Report test top-1 of both, per-gate keep fractions vs targets, and the throughput of both in the
   packed engine (interleaved timed rounds, medians).

Run: ``python eval/digits_experiment.py --out eval/results/digits`` (about 10 minutes on 2 CPU cores;
needs ``pip install -e '.[experiment]'``). Phases are cached in the output folder; ``--fresh`` retrains.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from torchvision.transforms import functional as TF

from nested_svit import SparseViT, create_model, load_checkpoint
from nested_svit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from nested_svit.registry import SVIT_KEEP_TARGETS
from nested_svit.training import TrainConfig, Trainer


def load_digits() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8]
    images = F.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    # quantise to 8 bits like an image file, then the standard ImageNet normalisation, so the
    # checkpoint works with `nested-svit predict` on 32x32 PNGs (EvalTransform, crop_pct 1.0)
    images = (images * 255).round().div(255).expand(-1, 3, -1, -1)
    images = TF.normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test, train = perm[:360], perm[360:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[test], labels[test])


def shift_augment(img: torch.Tensor) -> torch.Tensor:
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,)))
    return torch.roll(img, shifts=(dy, dx), dims=(1, 2))


def accuracy(model: SparseViT, data: TensorDataset) -> tuple[float, list[float]]:
    model.eval().set_execution("packed")
    images, labels = data.tensors
    with torch.inference_mode():
        feats, usage = model.forward_features(images, return_usage=True)
        top1 = float((model.forward_head(feats).argmax(-1) == labels).float().mean() * 100)
    return top1, usage.gate_keep_fraction().tolist()


def throughput(models: dict[str, SparseViT], images: torch.Tensor, rounds: int = 15) -> dict[str, float]:
    """Images/s per model; rounds interleaved (A B A B ...), median step time."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m.eval().set_execution("packed")
            m(images)
        for _ in range(rounds):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(images)
                times[name].append(time.perf_counter() - t0)
    return {k: len(images) / statistics.median(v) for k, v in times.items()}


def write_samples(test: TensorDataset, folder: Path, count: int = 20) -> None:
    """First ``count`` test digits as 32x32 PNGs in an ImageFolder tree (``<label>/<i>.png``)."""
    from PIL import Image

    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    for i in range(count):
        image, label = test[i]
        pixels = ((image * std + mean)[0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        path = folder / str(int(label)) / f"test{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "L").save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="eval/results/digits")
    p.add_argument("--dense-epochs", type=int, default=40)
    p.add_argument("--svit-epochs", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fresh", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_digits()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()

    timing_path = out / "train_seconds.json"  # kept beside the cached checkpoints
    timing = json.loads(timing_path.read_text()) if timing_path.exists() and not args.fresh else {}
    dense_path = out / "dense.pth"
    dense = create_model("vit_digits")
    if args.fresh or not dense_path.exists():
        cfg = TrainConfig(epochs=args.dense_epochs, batch_size=64, lr=1e-3, weight_decay=0.05, warmup_steps=50,
                          label_smoothing=0.1, seed=0)
        Trainer(dense, train, cfg, augment=shift_augment).fit(
            log=lambda s: s.step % 100 == 0 and log(f"dense step {s.step} loss {s.loss:.3f}"))
        torch.save({"model": dense.state_dict()}, dense_path)
        timing["dense_train_seconds"] = time.perf_counter() - t_start
    dense.load_state_dict(torch.load(dense_path)["model"])

    svit_path = out / "svit.pth"
    svit = create_model("svit_digits")
    if args.fresh or not svit_path.exists():
        load_checkpoint(svit, dense_path)  # backbone from the dense model, fresh gates
        cfg = TrainConfig(epochs=args.svit_epochs, batch_size=64, lr=1e-4, gate_lr=2e-3, ratio_weight=4.0,
                          ratio_loss="dynamic", label_smoothing=0.1, seed=1)
        Trainer(svit, train, cfg, augment=shift_augment).fit(
            log=lambda s: s.step % 50 == 0 and log(f"svit step {s.step} loss {s.loss:.3f} ratio {s.ratio_loss:.4f} "
                                                   f"keep {[round(k, 2) for k in s.keep]}"))
        torch.save({"model": svit.state_dict()}, svit_path)
        timing["svit_train_seconds"] = time.perf_counter() - t_start - timing.get("dense_train_seconds", 0.0)
        timing_path.write_text(json.dumps(timing))
    svit.load_state_dict(torch.load(svit_path)["model"])
    t_eval = time.perf_counter()

    dense_top1, _ = accuracy(dense, test)
    raw_top1, raw_keep = accuracy(svit, test)
    # Training constrains the *mean* keep probability (Gumbel samples keep a token with probability p);
    # deterministic inference keeps p > 0.5, which differs while gates are undecided. Calibrating the
    # thresholds on the training images (never the test set) makes inference match the targets.
    svit.calibrate_keep(train.tensors[0])
    torch.save({"model": svit.state_dict()}, out / "svit_calibrated.pth")
    svit_top1, keep = accuracy(svit, test)
    images = test.tensors[0]
    speed = {bs: throughput({"dense": dense, "svit": svit}, images[:bs]) for bs in (1, 64, 256, 360)}
    result = {
        "data": "scikit-learn digits (1797 8x8 images, upsampled to 32x32); 1437 train / 360 test",
        "models": ["vit_digits", "svit_digits"], "config": {k: v for k, v in vars(svit.config).items()},
        "dense_top1": dense_top1, "svit_top1": svit_top1, "top1_drop": dense_top1 - svit_top1,
        "keep_targets": list(SVIT_KEEP_TARGETS), "keep_fractions": keep,
        "uncalibrated": {"svit_top1": raw_top1, "keep_fractions": raw_keep},
        "max_keep_deviation": max(abs(k - t) for k, t in zip(keep, SVIT_KEEP_TARGETS)),
        "throughput_images_per_sec": {str(bs): v for bs, v in speed.items()},
        "speedup": {str(bs): v["svit"] / v["dense"] for bs, v in speed.items()},
        "threads": torch.get_num_threads(), **timing,
        "eval_and_throughput_seconds": time.perf_counter() - t_eval,
        "torch_version": torch.__version__,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    write_samples(test, out / "samples")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
