"""``nested-svit`` command line: bench, eval, predict, train."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _int_list(value: str) -> list[int]:
    return [int(v) for v in _csv_list(value)]


def _write_table(df, path: Path) -> None:
    from .io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        atomic_write_text(path, df.to_json(orient="records", indent=1))
    else:
        atomic_write_text(path, df.to_csv(index=False))


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .detection.registry import is_detector

    models = _csv_list(args.models)
    if any(is_detector(m) for m in models):
        if not all(is_detector(m) for m in models):
            raise ValueError("bench either classifiers or detectors in one run, not both")
        return _bench_detectors(args, models)

    from .benchmark import BenchConfig, run_benchmark

    cfg = BenchConfig(models=_csv_list(args.models), batch_sizes=_int_list(args.batch_sizes), device=args.device,
                      threads=args.threads, precision=args.precision, backends=_csv_list(args.backend),
                      input=args.input, img_size=args.img_size, rounds=args.rounds, min_time=args.min_time,
                      warmup=args.warmup,
                      calibrate=not args.no_calibrate, seed=args.seed)
    bar = tqdm(desc="bench", unit="step", file=sys.stderr)

    def progress(msg: str) -> None:
        bar.set_postfix_str(msg)
        bar.update(1)

    df = run_benchmark(cfg, progress)
    bar.close()
    out = Path(args.out)
    _write_table(df, out)
    if args.plot:
        from .viz import plot_throughput

        plot_throughput(df, args.plot)
    cols = ["model", "backend", "batch_size", "infer_samples_per_sec", "infer_step_time", "mean_kept_tokens",
            "gflops_per_image", "ideal_speedup", "speedup", "efficiency", "peak_mem_mb"]
    print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _bench_detectors(args: argparse.Namespace, models: list[str]) -> int:
    from tqdm import tqdm

    from .benchmark.detection import DetBenchConfig, run_detection_benchmark
    from .cli_detection import parse_img_scale

    cfg = DetBenchConfig(models=models, batch_sizes=_int_list(args.batch_sizes if args.batch_sizes != "1,8,32" else "1,2,4"),
                         img_scale=parse_img_scale(args.img_scale) or (1333, 800), device=args.device,
                         threads=args.threads, rounds=args.rounds if args.rounds != 10 else 3, warmup=min(args.warmup, 1),
                         calibrate=not args.no_calibrate, seed=args.seed, input=args.input)
    total = len(cfg.batch_sizes) * cfg.rounds * 2 * len(set(models) | {m.replace("svit_", "vit_") for m in models})
    bar = tqdm(total=total, desc="bench", unit="call", file=sys.stderr)

    def progress(msg: str) -> None:
        bar.set_postfix_str(msg)
        bar.update(1)

    df = run_detection_benchmark(cfg, progress)
    bar.close()
    out = Path(args.out)
    _write_table(df, out)
    cols = ["model", "part", "batch_size", "images_per_sec", "time_per_image_ms", "gflops_per_image", "ideal_speedup",
            "speedup", "efficiency", "mean_keep_ratio", "peak_mem_mb"]
    print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out}")
    return 0


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _prepare_job(args: argparse.Namespace, parts_dir: Path, kind: str):
    """Model + checkpoint (read and checked before any image), data set, manifest, process group."""
    import torch

    from . import create_model, load_checkpoint
    from .benchmark.harness import PRECISIONS
    from .data import EvalTransform, open_dataset
    from .evaluation import InferenceJob
    from .evaluation.distributed import init_from_env
    from .registry import eval_defaults

    device = _resolve_device(args.device)
    if args.batch_size is None:
        args.batch_size = 128
    defaults = eval_defaults(args.model)
    args.img_size = args.img_size or defaults["img_size"]
    args.crop_pct = args.crop_pct or defaults["crop_pct"]
    overrides = {"img_size": args.img_size}
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    torch.manual_seed(args.seed)  # --random-weights runs are reproducible (and resumable)
    model = create_model(args.model, **overrides)
    report = load_checkpoint(model, args.checkpoint) if args.checkpoint else None
    if report is None and not args.random_weights:
        raise ValueError("--checkpoint is required (or pass --random-weights to run an untrained model)")
    info = init_from_env(device)
    if device == "cuda" and info.world_size > 1:
        device = f"cuda:{info.local_rank}"
    model.to(device, PRECISIONS[args.precision]).eval().set_execution("packed", args.backend)
    if args.threads:
        torch.set_num_threads(args.threads)
    transform = EvalTransform(img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation)
    dataset = open_dataset(args.data, transform)
    if args.class_names:
        dataset.records.class_names = [ln.strip() for ln in Path(args.class_names).read_text().splitlines() if ln.strip()]
    manifest = {"kind": kind, "model": args.model, "checkpoint_sha256": report.sha256 if report else None,
                "data": str(Path(args.data).resolve()), "num_records": len(dataset), "batch_size": args.batch_size,
                "topk": args.topk, "transform": transform.describe(), "precision": args.precision,
                "img_size": args.img_size, "seed": args.seed if report is None else None}
    job = InferenceJob(model, dataset, parts_dir, manifest, args.batch_size, args.workers, args.topk,
                       torch.device(device), info)
    return job, report


def _run_job(job, label: str):
    """Run this process's share with a progress bar; wait for all processes. -> (images, seconds) of this run."""
    import time

    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from .evaluation import run_inference
    from .evaluation.distributed import barrier
    from .evaluation.runner import pending_batches

    todo = sum(len(b) for b in pending_batches(job))
    bar = tqdm(total=todo, desc=label, unit="img", file=sys.stderr, disable=not job.dist.is_main)
    seen = [0]

    def progress(state) -> None:
        bar.update(state.images - seen[0])
        seen[0] = state.images
        top1 = 100 * state.correct1 / state.labelled if state.labelled else float("nan")
        bar.set_postfix(top1=f"{top1:.2f}", img_s=f"{state.images / max(state.elapsed, 1e-9):.1f}")

    start = time.perf_counter()
    state = run_inference(job, progress)
    barrier(job.dist)
    seconds = time.perf_counter() - start
    bar.close()
    images = state.images
    if job.dist.world_size > 1:
        total = torch.tensor([images], dtype=torch.int64, device=job.device)  # nccl reduces CUDA tensors only
        dist.all_reduce(total)
        images = int(total)
    return images, seconds


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .evaluation import classification_metrics
    from .evaluation.distributed import shutdown
    from .evaluation.runner import merge_parts, remove_parts
    from .io import atomic_write_text

    out = Path(args.out)
    parts = out.with_name(out.name + ".parts")
    job, report = _prepare_job(args, parts, "eval-imagenet")
    try:
        images, seconds = _run_job(job, "eval")
        if job.dist.is_main:
            rows = merge_parts(parts, len(job.dataset))
            metrics = classification_metrics(rows, job.model.config, job.model.config.num_tokens, args.topk)
            result = {"model": args.model, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                      "checkpoint_sha256": report.sha256 if report else None,
                      "checkpoint_format": report.format if report else None,
                      "checkpoint_notes": report.notes if report else [],
                      **metrics, "images_per_sec": images / seconds if seconds > 0 else float("nan"),
                      "images_this_run": images, "data": job.manifest["data"], "data_kind": job.dataset.records.kind,
                      "label_source": job.dataset.records.label_source,
                      "transform": job.manifest["transform"], "batch_size": args.batch_size,
                      "world_size": job.dist.world_size, "device": str(job.device), "precision": args.precision,
                      "backend": args.backend, "torch_version": torch.__version__}
            atomic_write_text(out, json.dumps(result, indent=1))
            flat = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
            import pandas as pd

            atomic_write_text(out.with_suffix(".csv"), pd.DataFrame([flat]).to_csv(index=False))
            remove_parts(parts)
            print(f"top1 {result['top1']:.2f}  top5 {result['top5']:.2f}  images {result['num_images']}  "
                  f"skipped {result['num_skipped']}  keep {result['mean_keep_ratio_all_gates']:.3f}  -> {out}")
    finally:
        shutdown(job.dist)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .detection.registry import is_detector

    if is_detector(args.model) and not args.demo:
        from .cli_detection import cmd_predict_detection

        if not args.input:
            raise ValueError("--input is required: an image file or a directory of images")
        if args.batch_size is None:
            args.batch_size = 2
        return cmd_predict_detection(args)
    from .evaluation.distributed import shutdown
    from .evaluation.runner import merge_parts, remove_parts
    from .io import atomic_write

    if args.demo:  # bundled model + images: a real run with nothing to download
        from importlib import resources

        assets = resources.files("nested_svit.assets")
        args.model, args.checkpoint = "svit_digits", str(assets / "svit_digits.pth")
        args.input = args.input or str(assets / "digits_samples")
    if not args.input:
        raise ValueError("--input is required (or --demo)")
    out = Path(args.out)
    parts = out.with_name(out.name + ".parts")
    args.data = args.input
    job, _ = _prepare_job(args, parts, "predict")
    try:
        _run_job(job, "predict")
        if job.dist.is_main:
            rows = merge_parts(parts, len(job.dataset))
            if out.suffix == ".csv":
                atomic_write(out, lambda tmp: rows.to_csv(tmp, index=False))
            else:
                atomic_write(out, lambda tmp: rows.to_parquet(tmp, index=False))
            remove_parts(parts)
            print(f"{len(rows)} rows ({int((rows['status'] != 'ok').sum())} skipped) -> {out}")
    finally:
        shutdown(job.dist)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch
    from torchvision import transforms as T

    from . import create_model, load_checkpoint
    from .data import open_dataset
    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from .train import TrainConfig, Trainer

    model = create_model(args.model, img_size=args.img_size, reactivation=not args.no_reactivation,
                         gate_tau=args.tau, **({"num_classes": args.num_classes} if args.num_classes else {}))
    if args.init:
        for note in load_checkpoint(model, args.init).notes:
            print(f"note: {note}", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    records = open_dataset(args.data)
    if records.records.labels and min(records.records.labels) < 0:
        raise ValueError(f"{args.data}: training needs labelled images (ImageFolder tree or a data set with 'label')")
    augment = T.Compose([T.RandomResizedCrop(args.img_size, interpolation=T.InterpolationMode.BICUBIC),
                         T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, gate_lr=args.gate_lr,
                      weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, ratio_weight=args.ratio_weight,
                      ratio_loss=args.ratio_loss, freeze_backbone=args.freeze_backbone, amp=args.amp, seed=args.seed,
                      workers=args.workers, checkpoint_every=args.checkpoint_every,
                      device=_resolve_device(args.device))
    trainer = Trainer(model, _PilRecords(records), cfg, augment=augment, checkpoint_path=args.out)
    if args.resume or (args.out and Path(args.out).exists() and not args.restart):
        path = args.resume or args.out
        trainer.resume(path)
        print(f"resumed from {path} at epoch {trainer.epoch} step {trainer.global_step}", file=sys.stderr)
    log_path = Path(args.out).with_suffix(".log.jsonl")

    def log(entry) -> None:
        if entry.step % args.log_every == 0:
            line = json.dumps(entry.__dict__)
            with open(log_path, "a") as f:
                f.write(line + "\n")
            print(line, file=sys.stderr)

    trainer.fit(log=log)
    print(f"trained {trainer.global_step} steps -> {args.out}")
    return 0


class _PilRecords:
    """(decoded RGB PIL image, label) view of an image record data set, for training transforms."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        from .data.decode import BadImage

        try:
            return self.dataset.image(index), self.dataset.records.labels[index]
        except BadImage as e:
            raise ValueError(f"training image {self.dataset.records.ids[index]}: {e}") from e


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="svit_small")
    p.add_argument("--checkpoint", default=None, help="timm/DeiT or official SViT .pth")
    p.add_argument("--random-weights", action="store_true", help="allow running without a checkpoint")
    p.add_argument("--batch-size", type=int, default=None, help="default: 128 (classifiers), 2 (detectors)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--img-size", type=int, default=None, help="default: the model's (224 for DeiT/SViT)")
    p.add_argument("--crop-pct", type=float, default=None,
                   help="resize to img_size / crop_pct, then center-crop (default: the model's, DeiT 0.875)")
    p.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear", "nearest"])
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--class-names", default=None, help="text file, one class name per line")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="initialisation seed for --random-weights")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nested-svit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="throughput vs batch size, dense vs pruned, vs the FLOP ideal")
    b.add_argument("--models", default="deit_small_patch16_224,svit_small",
                   help="comma list; 'timm/<name>' for a timm model (needs timm)")
    b.add_argument("--batch-sizes", default="1,8,32", help="(detectors: default 1,2,4)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    b.add_argument("--backend", default="auto", help="comma list of attention backends: auto,loop,padded,nested,varlen")
    b.add_argument("--input", default="synthetic", help="'synthetic' or a directory of images")
    b.add_argument("--img-size", type=int, default=224)
    b.add_argument("--img-scale", default=None, help="detectors: W,H test scale (default 1333,800)")
    b.add_argument("--rounds", type=int, default=10)
    b.add_argument("--min-time", type=float, default=2.0,
                   help="more rounds at small batches: each runner is timed for at least this many seconds")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--no-calibrate", action="store_true", help="leave gates as loaded (trained checkpoints)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default="bench-results.csv", help=".csv or .json")
    b.add_argument("--plot", default="bench-throughput.png", help="PNG path ('' for none)")
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval", help="evaluate on a data set")
    esub = e.add_subparsers(dest="task", required=True)
    ei = esub.add_parser("imagenet", help="ImageNet-style top-1/top-5, keep ratios, token usage")
    _add_inference_args(ei)
    ei.add_argument("--data", required=True, help="ImageFolder tree, parquet shards or save_to_disk folder")
    ei.add_argument("--out", default="results.json")
    ei.set_defaults(func=cmd_eval)
    from .cli_detection import add_eval_coco_parser

    add_eval_coco_parser(esub)

    p = sub.add_parser("predict", help="offline batch prediction: one row per image")
    _add_inference_args(p)
    p.add_argument("--input", default=None, help="image directory, ImageFolder tree, parquet or Arrow data set")
    p.add_argument("--demo", action="store_true",
                   help="bundled SViT trained on digits (eval/digits_experiment.py) and bundled sample images")
    p.add_argument("--out", default="predictions.parquet", help=".parquet or .csv (detectors: .parquet, .json, .jsonl)")
    p.add_argument("--img-scale", default=None, help="detectors: W,H test scale (default: the model's, 1333,800)")
    p.add_argument("--save-vis", default=None, help="detectors: folder for PNGs with boxes, masks and kept tokens")
    p.set_defaults(func=cmd_predict)

    t = sub.add_parser("train", help="fine-tune SViT gates (masked execution, Gumbel masks, keep-ratio loss)")
    t.add_argument("--model", default="svit_small")
    t.add_argument("--init", default=None, help="dense (timm/DeiT) or SViT checkpoint to start from")
    t.add_argument("--data", required=True, help="labelled ImageFolder tree, parquet or Arrow data set")
    t.add_argument("--out", default="svit-finetuned.pth", help="training checkpoint (resumed if it exists)")
    t.add_argument("--resume", default=None)
    t.add_argument("--restart", action="store_true", help="ignore an existing --out checkpoint")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-5, help="backbone learning rate")
    t.add_argument("--gate-lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--ratio-weight", type=float, default=4.0, help="lambda of the keep-ratio loss")
    t.add_argument("--ratio-loss", default="dynamic", choices=["dynamic", "fixed"])
    t.add_argument("--no-reactivation", action="store_true", help="M_l <- M_l * M_(l-1)")
    t.add_argument("--tau", type=float, default=1.0, help="Gumbel-softmax temperature")
    t.add_argument("--freeze-backbone", action="store_true")
    t.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    t.add_argument("--img-size", type=int, default=224)
    t.add_argument("--num-classes", type=int, default=None)
    t.add_argument("--device", default="auto")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=0, help="steps (0: end of each epoch)")
    t.add_argument("--log-every", type=int, default=10)
    t.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted: finished batches are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
