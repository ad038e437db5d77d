"""nested-svit command line: bench, eval, predict, train."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
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
    from .benchmark.harness import TIMM_PREFIX
    from .registry import get_config

    for m in models:
        if not m.startswith(TIMM_PREFIX):
            get_config(m)  # unknown names fail now, with the list of models
    out = Path(args.out)
    if out.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--out {out}: use .csv or .json")
    check_writable(out)
    if args.plot:
        check_writable(Path(args.plot))
    batch_sizes = _int_list(args.batch_sizes)
    cfg = BenchConfig(models=models, batch_sizes=batch_sizes, device=args.device,
                      threads=args.threads, precision=args.precision, backends=_csv_list(args.backend),
                      input=args.input, img_size=args.img_size, rounds=args.rounds, min_time=args.min_time,
                      warmup=args.warmup,
                      calibrate=not args.no_calibrate, keep_targets=args.keep_targets, seed=args.seed)
    bar = tqdm(total=len(batch_sizes), desc="bench", unit="batch size", file=sys.stderr)

    def progress(msg: str) -> None:  # "batch {bs}: round i/n"
        bs = int(msg.split(":")[0].split()[1])
        bar.n = batch_sizes.index(bs)
        bar.set_postfix_str(msg)

    df = run_benchmark(cfg, progress)
    bar.n = len(batch_sizes)
    bar.close()
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


def _classifier(args: argparse.Namespace):
    """Classifier for ``args`` with its checkpoint loaded (before any image is read): the model name and
    config a ``train`` checkpoint carries win over flags that were not given. -> (model, report)."""
    from dataclasses import replace

    import torch

    from . import load_checkpoint
    from .checkpoint import checkpoint_model_config
    from .config import ViTConfig
    from .model import SparseViT
    from .registry import create_model, eval_defaults, get_config

    file_name, file_cfg, file_names = checkpoint_model_config(args.checkpoint)
    if file_cfg is not None and args.model and file_name and args.model != file_name:
        raise ValueError(f"--model {args.model} but {args.checkpoint} holds a trained {file_name}; drop --model")
    name = (file_name if file_cfg is not None else None) or args.model or "svit_small"
    try:
        defaults = eval_defaults(name)
    except ValueError:
        defaults = {"img_size": None, "crop_pct": 0.875}
    overrides: dict = {}
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    torch.manual_seed(args.seed)  # --random-weights runs are reproducible (and resumable)
    if file_cfg is not None:
        for key in ("gate_blocks", "keep_targets"):
            file_cfg[key] = tuple(file_cfg[key])
        config = replace(ViTConfig(**file_cfg), **overrides)
        model = SparseViT(config)
        model.name = name
    else:
        get_config(name)  # unknown names fail here with the list of models
        model = create_model(name, **overrides)
    args.model = name
    if file_names and len(file_names) == model.config.num_classes:
        model.class_names = file_names
    args.img_size = model.config.img_size if args.img_size is None else args.img_size
    args.crop_pct = args.crop_pct if args.crop_pct is not None else defaults["crop_pct"]
    if args.img_size % model.config.patch_size:
        raise ValueError(f"--img-size {args.img_size} is not a multiple of the patch size {model.config.patch_size}")
    report = load_checkpoint(model, args.checkpoint) if args.checkpoint else None
    if report is None and not args.random_weights:
        raise ValueError("--checkpoint is required (or pass --random-weights to run an untrained model)")
    if report is not None and model.num_gates and any("gates keep their initialisation" in n for n in report.notes):
        note = ("warning: the checkpoint has no gate weights, so the gates of this SViT model are random: pruning "
                "is arbitrary. Fine-tune with 'nested-svit train', or run the dense model")
        report.notes.append(note)
        print(note, file=sys.stderr)
    return model, report


def _calibrate(args: argparse.Namespace, model, transform, device: str) -> dict | None:
    """``--calibrate N [--keep-targets T] [--calibrate-data DIR]``: shift the gate thresholds so the
    keep fractions on N images hit the targets (no retraining); ``--save-calibrated`` keeps the result."""
    from .data import open_dataset
    from .stack import keep_targets_from_cli

    if args.keep_targets and not args.calibrate:
        raise ValueError("--keep-targets needs --calibrate N (the number of images to calibrate the gates on)")
    if not args.calibrate:
        return None
    if args.calibrate < 1:
        raise ValueError(f"--calibrate must be >= 1 images, got {args.calibrate}")
    if model.num_gates == 0 or model.config.method != "svit":
        raise ValueError(f"{args.model} has no SViT gates to calibrate (--calibrate shifts SViT gate thresholds; "
                         f"the {model.config.method} method keeps its own counts)")
    targets = keep_targets_from_cli(args.keep_targets, model.config.keep_targets) if args.keep_targets \
        else list(model.config.keep_targets)
    source = args.calibrate_data or args.data
    data = open_dataset(source, transform, split=args.split, exclude=[args.out])
    images = []
    for i in range(len(data)):
        item = data[i]
        if item["image"] is not None:
            images.append(item["image"])
        if len(images) == args.calibrate:
            break
    if not images:
        raise ValueError(f"no decodable images in {source} to calibrate on")
    import torch

    reached = model.calibrate_keep(torch.stack(images).to(device, model.dtype), targets)
    result = {"images": len(images), "data": str(source), "targets": targets, "reached": [round(r, 4) for r in reached]}
    print(f"calibrated gates on {len(images)} images: keep fractions {', '.join(f'{r:.3f}' for r in reached)}",
          file=sys.stderr)
    if args.save_calibrated:
        from .io import atomic_write

        payload = {"model": model.state_dict(), "model_name": model.name, "model_config": asdict(model.config),
                   "class_names": getattr(model, "class_names", None), "calibration": result}
        atomic_write(args.save_calibrated, lambda tmp: torch.save(payload, tmp))
    return result


def _model_class_names(args: argparse.Namespace, model) -> list[str] | None:
    """Names of the model's outputs: --class-names, else those its checkpoint carries, else ImageNet's
    for a 1000-class model, else none (ids only). Never the data's folder names."""
    from .data.classes import imagenet_classes

    k = model.config.num_classes
    if args.class_names:
        names = [ln.strip() for ln in Path(args.class_names).read_text().splitlines() if ln.strip()]
        if len(names) != k:
            raise ValueError(f"--class-names lists {len(names)} names, the model has {k} classes")
        return names
    carried = getattr(model, "class_names", None)
    if carried:
        return list(carried)
    return list(imagenet_classes()[1]) if k == 1000 else None


def _validate_inference_args(args: argparse.Namespace) -> None:
    """Every argument error a user can make, before any work starts (one line each)."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if getattr(args, "topk", 1) < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise ValueError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.img_size is not None and args.img_size < 1:
        raise ValueError(f"--img-size must be positive, got {args.img_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    check_writable(Path(args.out))


def check_writable(out: Path) -> None:
    """Fail early when ``out`` cannot be written (read-only folder, a file where a folder must be)."""
    import os

    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"cannot write {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {out}: no write permission in {probe}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name")


def _prepare_job(args: argparse.Namespace, parts_dir: Path, kind: str):
    """Model + checkpoint (read and checked before any image), data set, manifest, process group."""
    import torch

    from .benchmark.harness import PRECISIONS
    from .data import EvalTransform, open_dataset
    from .evaluation import InferenceJob
    from .evaluation.distributed import init_from_env

    device = _resolve_device(args.device)
    if args.batch_size is None:
        args.batch_size = 128
    _validate_inference_args(args)
    model, report = _classifier(args)
    info = init_from_env(device)
    if device == "cuda" and info.world_size > 1:
        device = f"cuda:{info.local_rank}"
    model.to(device, PRECISIONS[args.precision]).eval().set_execution("packed", args.backend)
    if args.threads:
        torch.set_num_threads(args.threads)
    transform = EvalTransform(img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation)
    dataset = open_dataset(args.data, transform, split=args.split, exclude=[args.out, parts_dir],
                           exif=kind == "predict", max_pixels=args.max_image_pixels)
    class_names = _model_class_names(args, model)
    calibration = _calibrate(args, model, transform, device)
    source = dataset.records.label_source
    if source == "sorted_class_dirs" and model.config.num_classes == 1000:
        print(f"WARNING: {args.data}: class folders are not (all) ImageNet wnids, so labels are the sorted folder "
              "order 0..K-1, not ImageNet's class ids: top-1/top-5 against a 1000-class model are meaningless. "
              "Name folders by wnid (n01440764, ...) or use a model trained on these classes.", file=sys.stderr)
    manifest = {"kind": kind, "model": args.model, "checkpoint_sha256": report.sha256 if report else None,
                "data": str(Path(args.data).resolve()), "num_records": len(dataset), "batch_size": args.batch_size,
                "topk": args.topk, "transform": transform.describe(), "precision": args.precision,
                "img_size": args.img_size, "seed": args.seed if report is None else None,
                "files_digest": dataset.records.digest(), "split": args.split, "calibration": calibration}
    job = InferenceJob(model, dataset, parts_dir, manifest, args.batch_size, args.workers, args.topk,
                       torch.device(device), info, class_names)
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
        bar.update(state.seen - seen[0])
        seen[0] = state.seen
        post = {"img_s": f"{state.images / max(state.elapsed, 1e-9):.1f}"}
        if label == "eval" and state.labelled:
            post["top1"] = f"{100 * state.correct1 / state.labelled:.2f}"
        bar.set_postfix(post)

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
    suffix = out.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise ValueError(f"--out {out}: use .json (full result; a one-row .csv summary is written beside it) or .csv")
    json_out, csv_out = out.with_suffix(".json"), out.with_suffix(".csv")
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
                      "ignored_files": [{"path": p, "reason": why} for p, why in job.dataset.records.ignored],
                      "transform": job.manifest["transform"], "batch_size": args.batch_size,
                      "world_size": job.dist.world_size, "device": str(job.device), "precision": args.precision,
                      "backend": args.backend, "torch_version": torch.__version__}
            atomic_write_text(json_out, json.dumps(result, indent=1))
            flat = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
            import pandas as pd

            atomic_write_text(csv_out, pd.DataFrame([flat]).to_csv(index=False))
            remove_parts(parts)
            scores = (f"top1 {result['top1']:.2f}  top5 {result['top5']:.2f}" if result["num_images"] else
                      "no labelled images: top-1/top-5 not computed")
            print(f"{scores}  images {result['num_predicted']}  "
                  f"skipped {result['num_skipped']}  keep {result['mean_keep_ratio_all_gates']:.3f}  -> {json_out}, {csv_out}")
    finally:
        shutdown(job.dist)
    return 0


def _token_pictures(folder: Path, model):
    """Callback writing one PNG per predicted image: the crop the model saw and the tokens each gate (each
    selection stage of a baseline) kept."""
    import torch

    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from .io import atomic_write
    from .viz import token_usage_picture

    folder.mkdir(parents=True, exist_ok=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def write(batch: dict, images, usage) -> None:
        b, _, h, w = images.shape
        gh, gw = h // model.config.patch_size, w // model.config.patch_size
        prefix = 1 if model.cls_token is not None else 0
        # per stage the patch rows kept (virtual rows, e.g. EViT's fused tokens, come after the patches)
        masks = [m.bool().view(b, -1)[:, prefix:prefix + gh * gw].reshape(b, gh, gw).cpu() for m in usage.masks]
        for j, name in enumerate(batch["id"]):
            rgb = ((images[j].float().cpu() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            keep = torch.stack([m[j] for m in masks]) if masks else torch.zeros(0, gh, gw, dtype=torch.bool)
            picture = token_usage_picture(rgb, keep, scale=max(1, 256 // max(h, w)))
            target = folder / (Path(str(name)).with_suffix("").as_posix().replace("/", "__") + ".png")
            atomic_write(target, lambda tmp: picture.save(tmp, format="PNG"))

    return write


PREDICT_FORMATS = (".parquet", ".csv", ".json", ".jsonl")


def cmd_predict(args: argparse.Namespace) -> int:
    from .cli_detection import _read_detector_file_config
    from .detection.registry import is_detector

    if args.demo and (args.model or args.checkpoint):
        raise ValueError("--demo runs the bundled digits model; drop --model/--checkpoint (or drop --demo)")
    if not args.demo and (is_detector(args.model) or
                          (args.model is None and _read_detector_file_config(args.checkpoint)[1] is not None)):
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
    fmt = out.suffix.lower()
    if fmt not in PREDICT_FORMATS:
        raise ValueError(f"--out {out}: the extension must be one of {', '.join(PREDICT_FORMATS)}")
    parts = out.with_name(out.name + ".parts")
    args.data = args.input
    job, _ = _prepare_job(args, parts, "predict")
    if args.save_vis:
        job.on_batch = _token_pictures(Path(args.save_vis), job.model)
    try:
        _run_job(job, "predict")
        if job.dist.is_main:
            rows = merge_parts(parts, len(job.dataset))
            if fmt == ".csv":
                atomic_write(out, lambda tmp: rows.to_csv(tmp, index=False))
            elif fmt in (".json", ".jsonl"):
                atomic_write(out, lambda tmp: rows.to_json(tmp, orient="records", lines=fmt == ".jsonl",
                                                          indent=None if fmt == ".jsonl" else 1))
            else:
                atomic_write(out, lambda tmp: rows.to_parquet(tmp, index=False))
            remove_parts(parts)
            print(f"{len(rows)} rows ({int((rows['status'] != 'ok').sum())} skipped) -> {out}")
            ignored = job.dataset.records.ignored
            if ignored:
                print(f"{len(ignored)} files ignored (no row): " + "; ".join(f"{p} ({why})" for p, why in ignored[:10])
                      + (" ..." if len(ignored) > 10 else ""), file=sys.stderr)
    finally:
        shutdown(job.dist)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch
    from torchvision import transforms as T

    from . import create_model
    from .data import open_dataset
    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from .train import TrainConfig, Trainer

    from .checkpoint import checkpoint_model_config
    from .detection.registry import is_detector

    if is_detector(args.model):
        from .cli_detection import cmd_train_detector

        return cmd_train_detector(args)
    detector_only = [flag for flag, value in (("--ann", args.ann), ("--images", args.images), ("--img-scale", args.img_scale),
                                              ("--schedule", args.schedule), ("--steps", args.steps),
                                              ("--multiscale-crop", args.multiscale_crop),
                                              ("--no-sync-bn", args.no_sync_bn)) if value]
    if detector_only:
        verb = "apply" if len(detector_only) > 1 else "applies"
        raise ValueError(f"{', '.join(detector_only)} only {verb} to detectors; {args.model} is a classifier")
    if not args.data:
        raise ValueError("--data is required: a labelled ImageFolder tree, parquet or Arrow data set")
    for key, value in (("epochs", 30), ("batch_size", 64), ("lr", 1e-5), ("gate_lr", 1e-3), ("weight_decay", 0.05),
                       ("warmup_steps", 0)):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_writable(Path(args.out))
    records = open_dataset(args.data)
    labels = records.records.labels
    if not labels or max(labels) < 0:
        raise ValueError(f"{args.data}: training needs labelled images (ImageFolder tree or a data set with 'label')")
    if min(labels) < 0 and isinstance(records.records.sources, list):  # files outside class folders: no label
        r = records.records
        keep = [i for i, lab in enumerate(r.labels) if lab >= 0]
        train_note(f"{len(r.labels) - len(keep)} files outside class folders have no label and are not trained on")
        r.sources, r.labels, r.ids = [r.sources[i] for i in keep], [r.labels[i] for i in keep], [r.ids[i] for i in keep]
    data_classes = max(records.records.labels) + 1
    if args.num_classes is not None and args.num_classes < data_classes:
        raise ValueError(f"--num-classes {args.num_classes}, but the data has labels up to {data_classes - 1} "
                         f"({data_classes} classes)")
    _, init_cfg, _ = checkpoint_model_config(args.init)
    num_classes = args.num_classes or (init_cfg or {}).get("num_classes") or data_classes
    torch.manual_seed(args.seed)  # the initialisation (head, gates without --init) depends on --seed only
    model = create_model(args.model, reactivation=not args.no_reactivation, gate_tau=args.tau, num_classes=num_classes,
                         **({"img_size": args.img_size} if args.img_size else {}))
    args.img_size = model.config.img_size
    if records.records.class_names and len(records.records.class_names) == num_classes:
        model.class_names = list(records.records.class_names)
    if args.img_size % model.config.patch_size:
        raise ValueError(f"--img-size {args.img_size} is not a multiple of the patch size {model.config.patch_size}")
    if args.init:
        for note in _load_init(model, args.init):
            train_note(note)
    if args.threads:
        torch.set_num_threads(args.threads)
    augment = T.Compose([T.RandomResizedCrop(args.img_size, interpolation=T.InterpolationMode.BICUBIC),
                         T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, gate_lr=args.gate_lr,
                      weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, ratio_weight=args.ratio_weight,
                      ratio_loss=args.ratio_loss, freeze_backbone=args.freeze_backbone, amp=args.amp, seed=args.seed,
                      workers=args.workers, checkpoint_every=args.checkpoint_every,
                      drop_path=args.drop_path or 0.0, device=_resolve_device(args.device))
    join_process_group(cfg.device)
    trainer = Trainer(model, _PilRecords(records), cfg, augment=augment, checkpoint_path=args.out)
    return fit_with_progress(args, trainer, args.epochs,
                             lambda e: {"loss": f"{e.loss:.3f}", "ratio": f"{e.ratio_loss:.3f}"})


def train_note(message: str) -> None:
    """A ``note:`` line on stderr, once per run (rank 0 under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {message}", file=sys.stderr)


def join_process_group(device: str) -> None:
    """Under torchrun (``WORLD_SIZE`` > 1) join the process group before a trainer is built: it reads the
    group (``parallel.current``) to shard batches and average gradients."""
    from .parallel import init_from_env

    init_from_env(device)


def fit_with_progress(args: argparse.Namespace, trainer, epochs: int, postfix) -> int:
    """Resume from ``--out``/``--resume`` unless ``--restart``, trim the ``<out>.log.jsonl`` lines of steps
    that will be redone, train with a progress bar, log every ``--log-every`` steps (classifiers and detectors).
    Under torchrun rank 0 alone shows the bar and writes the log and the checkpoint."""
    from tqdm import tqdm

    from .parallel import shutdown

    main_rank = trainer.dist.is_main
    try:
        if args.resume or (args.out and Path(args.out).exists() and not args.restart):
            path = args.resume or args.out
            trainer.resume(path)
            if main_rank:
                print(f"resumed from {path} at epoch {trainer.epoch} step {trainer.global_step}", file=sys.stderr)
        log_path = Path(args.out).with_suffix(".log.jsonl")
        if main_rank:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            if log_path.exists():  # drop log lines of steps after the checkpoint we resumed from (they are redone)
                kept = [ln for ln in log_path.read_text().splitlines()
                        if ln.strip() and json.loads(ln)["step"] < trainer.global_step]
                log_path.write_text("".join(ln + "\n" for ln in kept))
        bar = tqdm(total=epochs * trainer.steps_per_epoch, initial=trainer.global_step, desc="train", unit="step",
                   file=sys.stderr, disable=not main_rank)

        def log(entry) -> None:
            bar.update(1)
            post = postfix(entry)
            if post:
                bar.set_postfix(**post, skipped=trainer.skipped)
            if main_rank and entry.step % args.log_every == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(entry.__dict__) + "\n")

        trainer.fit(log=log)
        bar.close()
        if main_rank:
            world = f" on {trainer.dist.world_size} processes" if trainer.dist.world_size > 1 else ""
            print(f"trained {trainer.global_step} steps{world} ({trainer.skipped} unreadable images skipped) -> {args.out}")
    finally:
        shutdown(trainer.dist)
    return 0


def _load_init(model, path: str) -> list[str]:
    """``--init``: load weights; a classification head of another size (e.g. ImageNet's 1000 classes
    for 3 folders) is re-initialised, with a note."""
    from . import load_checkpoint
    from .checkpoint import CheckpointError, read_state_dict

    try:
        return load_checkpoint(model, path).notes
    except CheckpointError as e:
        state, _, _ = read_state_dict(path)
        head = {k for k in ("head.weight", "head.bias") if k in state and state[k].shape != model.state_dict()[k].shape}
        if not head:
            raise
        rest = {k: v for k, v in state.items() if k not in head}
        notes = load_checkpoint(model, rest, strict=False).notes
        missing = set(model.state_dict()) - set(rest) - {"head.weight", "head.bias"}
        if missing - {k for k in missing if k.startswith("gates.")}:
            raise e
        return notes + [f"head re-initialised: the checkpoint's head has {state['head.weight'].shape[0]} classes, "
                        f"the model {model.config.num_classes}"]


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
        except BadImage:
            return None, self.dataset.records.labels[index]  # skipped and counted by the trainer


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="default: the model a train checkpoint carries, else svit_small (classifiers) ")
    p.add_argument("--checkpoint", default=None, help="timm/DeiT, official SViT or 'nested-svit train' .pth")
    p.add_argument("--random-weights", action="store_true", help="allow running without a checkpoint")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (None: 128 classifiers, 2 detectors)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's default)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute precision")
    p.add_argument("--backend", default="auto", help="variable-length attention backend (auto, loop, padded, nested, varlen)")
    p.add_argument("--img-size", type=int, default=None, help="default: the model's (224 for DeiT/SViT)")
    p.add_argument("--crop-pct", type=float, default=None,
                   help="resize to img_size / crop_pct, then center-crop (default: the model's, DeiT 0.875)")
    p.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear", "nearest"], help="resize interpolation of the eval transform")
    p.add_argument("--num-classes", type=int, default=None, help="model outputs (None: the checkpoint's / model's)")
    p.add_argument("--class-names", default=None, help="text file, one class name per line")
    p.add_argument("--topk", type=int, default=5, help="classes per image in the output")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed for --random-weights")
    p.add_argument("--keep-targets", default=None,
                   help="gate keep budget: 9 fractions, or one factor scaling the model's (needs --calibrate)")
    p.add_argument("--calibrate", type=int, default=0, help="calibrate gate thresholds on this many input images")
    p.add_argument("--calibrate-data", default=None, help="calibrate on these images instead of the input")
    p.add_argument("--save-calibrated", default=None, help="write the calibrated model (loads with --checkpoint)")
    p.add_argument("--split", default=None, help="split of a save_to_disk DatasetDict (default: validation, else the first)")
    p.add_argument("--max-image-pixels", type=int, default=None,
                   help="larger images are skipped with the reason (default 1e9; Pillow's own 89 Mpx warning is off)")


_FMT = argparse.ArgumentDefaultsHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="nested-svit", formatter_class=_FMT, description=(
        "Token-pruned Vision Transformers (SViT) on ragged batches: benchmark, evaluate, predict, train."))
    parser.add_argument("--version", action="version", version=f"nested-svit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="throughput vs batch size, dense vs pruned, vs the FLOP ideal", formatter_class=_FMT)
    b.add_argument("--models", default="deit_small_patch16_224,svit_small",
                   help="comma list; 'timm/<name>' for a timm model (needs timm)")
    b.add_argument("--batch-sizes", default="1,8,32", help="(detectors: default 1,2,4)")
    b.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's default)")
    b.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute precision")
    b.add_argument("--backend", default="auto", help="comma list of attention backends: auto,loop,padded,nested,varlen")
    b.add_argument("--input", default="synthetic", help="'synthetic' or a directory of images")
    b.add_argument("--img-size", type=int, default=None, help="default: the model's")
    b.add_argument("--img-scale", default=None, help="detectors: W,H test scale (default 1333,800)")
    b.add_argument("--rounds", type=int, default=10, help="timed interleaved rounds per batch size (at least)")
    b.add_argument("--min-time", type=float, default=2.0,
                   help="more rounds at small batches: each runner is timed for at least this many seconds")
    b.add_argument("--warmup", type=int, default=2, help="untimed calls per runner first")
    b.add_argument("--no-calibrate", action="store_true", help="leave gates as loaded (trained checkpoints)")
    b.add_argument("--keep-targets", default=None, help="calibrate gates to these 9 fractions, or scale the model's")
    b.add_argument("--seed", type=int, default=0, help="random seed")
    b.add_argument("--out", default="bench-results.csv", help=".csv or .json")
    b.add_argument("--plot", default="bench-throughput.png", help="PNG path ('' for none)")
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval", help="evaluate on a data set", formatter_class=_FMT)
    esub = e.add_subparsers(dest="task", required=True)
    ei = esub.add_parser("imagenet", help="ImageNet-style top-1/top-5, keep ratios, token usage", formatter_class=_FMT)
    _add_inference_args(ei)
    ei.add_argument("--data", "--input", dest="data", required=True,
                    help="ImageFolder tree (wnid folders -> ImageNet ids), parquet shards/file or save_to_disk folder")
    ei.add_argument("--out", default="results.json", help="output file")
    ei.set_defaults(func=cmd_eval)
    from .cli_detection import add_eval_coco_parser

    add_eval_coco_parser(esub)

    p = sub.add_parser("predict", help="offline batch prediction: one row per image", formatter_class=_FMT)
    _add_inference_args(p)
    p.add_argument("--input", "--data", dest="input", default=None,
                   help="image folder or ImageFolder tree, one image, a .parquet file or shards, an Arrow folder, "
                        "a .txt list of paths, or a quoted glob ('photos/*.jpg')")
    p.add_argument("--demo", action="store_true",
                   help="bundled SViT trained on digits (eval/digits_experiment.py) and bundled sample images")
    p.add_argument("--out", default="predictions.parquet", help=".parquet or .csv (detectors: .parquet, .json, .jsonl)")
    p.add_argument("--img-scale", default=None, help="detectors: W,H test scale (default: the model's, 1333,800)")
    p.add_argument("--save-vis", default=None, help="detectors: folder for PNGs with boxes, masks and kept tokens")
    p.set_defaults(func=cmd_predict)

    t = sub.add_parser("train", help="fine-tune SViT gates (masked execution, Gumbel masks, keep-ratio loss)", formatter_class=_FMT)
    t.add_argument("--model", default="svit_small", help="model name (nested-svit list: see README)")
    t.add_argument("--init", default=None, help="dense (timm/DeiT) or SViT checkpoint to start from")
    t.add_argument("--data", default=None, help="labelled ImageFolder tree, parquet or Arrow data set; detectors: COCO root")
    t.add_argument("--split", default="train2017", help="detectors: COCO split under --data")
    t.add_argument("--ann", default=None, help="detectors: COCO-format annotation json (with --images)")
    t.add_argument("--images", default=None, help="detectors: image folder of --ann")
    t.add_argument("--img-scale", default=None, help="detectors: W,H training scale (default: the model's 1333,800)")
    t.add_argument("--schedule", default=None, choices=["step", "cosine"], help="detectors: lr decay (default step)")
    t.add_argument("--steps", default=None, help="detectors: epochs at which a step schedule multiplies lr by 0.1")
    t.add_argument("--clip-grad", type=float, default=None, help="max gradient norm")
    t.add_argument("--flip", type=float, default=0.5, help="detectors: horizontal flip probability")
    t.add_argument("--drop-path", type=float, default=None,
                   help="stochastic depth rate, linear over the blocks (default: detectors 0.1 tiny / 0.2 small "
                        "as the official configs; classifiers 0)")
    t.add_argument("--no-sync-bn", action="store_true",
                   help="detectors under torchrun: BatchNorm statistics per process (default: over all, as SyncBN)")
    t.add_argument("--multiscale-crop", action="store_true",
                   help="detectors: the official multi-scale + random-crop augmentation (short side 480..800, "
                        "crops of 384..600 px) instead of one --img-scale")
    t.add_argument("--out", default="svit-finetuned.pth", help="training checkpoint (resumed if it exists)")
    t.add_argument("--resume", default=None, help="training checkpoint to resume from (default: --out if it exists)")
    t.add_argument("--restart", action="store_true", help="ignore an existing --out checkpoint")
    t.add_argument("--epochs", type=int, default=None, help="training epochs (None: 30 classifiers, 12 detectors)")
    t.add_argument("--batch-size", type=int, default=None, help="images per step (None: 64 classifiers, 2 detectors)")
    t.add_argument("--lr", type=float, default=None,
                   help="learning rate (None: 1e-5 classifiers; detectors 1e-4, or 1e-5 fine-tuning SViT from --init)")
    t.add_argument("--gate-lr", type=float, default=None, help="learning rate of the gates (None: 1e-3 classifiers, --lr detectors)")
    t.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (None: 0.05; 1e-6 SViT detector fine-tune)")
    t.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (None: 0 classifiers, 500 detectors)")
    t.add_argument("--ratio-weight", type=float, default=4.0, help="lambda of the keep-ratio loss")
    t.add_argument("--ratio-loss", default="dynamic", choices=["dynamic", "fixed"], help="keep-ratio loss: dynamic (Eq. 2, batch average) or fixed (Eq. 3, per image)")
    t.add_argument("--no-reactivation", action="store_true", help="M_l <- M_l * M_(l-1)")
    t.add_argument("--tau", type=float, default=1.0, help="Gumbel-softmax temperature")
    t.add_argument("--freeze-backbone", action="store_true", help="train the gates only")
    t.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    t.add_argument("--img-size", type=int, default=None, help="default: the model's (224 DeiT/SViT, 32 digits)")
    t.add_argument("--num-classes", type=int, default=None, help="model outputs (None: the checkpoint's / model's)")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's default)")
    t.add_argument("--workers", type=int, default=2, help="DataLoader processes")
    t.add_argument("--seed", type=int, default=0, help="random seed")
    t.add_argument("--checkpoint-every", type=int, default=0, help="steps (0: end of each epoch)")
    t.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    t.set_defaults(func=cmd_train)
    return parser


def _close_bars() -> None:
    """Close open progress bars, so a message starts on its own line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*nested tensors is in prototype stage.*")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _close_bars()
        print("interrupted: finished batches are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, RuntimeError) as e:
        _close_bars()
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
