"""``nested-svit train``: SViT gate fine-tuning, the baselines that train (each method says so), and
detectors (dense ViT-Adapter, SViT-Adapter, the baselines as backbones); resumable, torchrun data parallel."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import options
from .arguments import CLS, DET
from .common import check_writable, note, parse_img_scale, progress_bar
from .models import show
from .runs import run_options


def add_parser(sub, formatter) -> None:
    from ..methods import METHODS
    from ..training import DetTrainConfig, TrainConfig

    baselines = ", ".join(m.title for m in METHODS.values() if m.train_execution == "packed")
    about = ("train SViT gates (masked execution, Gumbel masks, keep-ratio loss), the baselines that train "
             f"({baselines}: through their own selection) and detectors (ViT-Adapter / SViT-Adapter Mask "
             "R-CNN, the baselines as backbones); resumable, data parallel under torchrun")
    t = sub.add_parser("train", formatter_class=formatter, help=about, description=about)
    t.add_argument("--model", default="svit_small", help="model or detector name (nested-svit list)")
    t.add_argument("--init", default=None, help="checkpoint to start from: dense (timm/DeiT), SViT, a baseline's, "
                                                "or a detector file (detectors)")
    t.add_argument("--data", default=None, help="labelled ImageFolder tree, parquet or Arrow data set; detectors: COCO root")
    t.add_argument("--out", default="svit-finetuned.pth", help="training checkpoint (resumed if it exists)")
    t.add_argument("--resume", default=None, help="training checkpoint to resume from (default: --out if it exists)")
    t.add_argument("--restart", action="store_true", help="ignore an existing --out checkpoint")
    options.add(t, t, "--export", defaults={CLS: None}, metavar="DIR",
                help="after training, also write the model as DIR/model.safetensors + a timm-style config.json "
                     "(loads with --checkpoint DIR; a dense model also with timm.create_model('local-dir:DIR', "
                     "pretrained=True))")
    s = t.add_argument_group("schedule")
    options.add(t, s, "--epochs", type=int, defaults={CLS: TrainConfig.epochs, DET: DetTrainConfig.epochs},
                help="training epochs")
    options.add(t, s, "--batch-size", type=int, defaults={CLS: TrainConfig.batch_size, DET: DetTrainConfig.batch_size},
                help="images per step (under torchrun: over all processes)")
    options.add(t, s, "--lr", type=float, defaults={CLS: TrainConfig.lr, DET: None},
                help="learning rate (detectors: 1e-4, or 1e-5 fine-tuning a pruned detector from --init)")
    options.add(t, s, "--gate-lr", type=float, defaults={CLS: TrainConfig.gate_lr, DET: None},
                help="learning rate of the selectors (detectors: --lr)")
    options.add(t, s, "--weight-decay", type=float, defaults={CLS: TrainConfig.weight_decay, DET: None},
                help="AdamW weight decay (detectors: 0.05; 1e-6 fine-tuning a pruned detector)")
    options.add(t, s, "--warmup-steps", type=int, defaults={CLS: TrainConfig.warmup_steps, DET: DetTrainConfig.warmup_steps},
                help="linear warm-up steps")
    options.add(t, s, "--schedule", choices=["step", "cosine"], defaults={DET: DetTrainConfig.schedule}, help="lr decay")
    options.add(t, s, "--steps", defaults={DET: ",".join(map(str, DetTrainConfig.steps))},
                help="epochs at which a step schedule multiplies lr by 0.1")
    options.add(t, s, "--clip-grad", type=float, defaults={DET: None}, help="max gradient norm")
    options.add(t, s, "--freeze-backbone", action="store_true", defaults={CLS: False}, help="train the selectors only")
    loss = t.add_argument_group("pruning and losses")
    loss.add_argument("--ratio-weight", type=float, default=4.0, help="lambda of the keep-ratio loss")
    loss.add_argument("--ratio-loss", default="dynamic", choices=["dynamic", "fixed"],
                      help="keep-ratio loss: dynamic (Eq. 2, batch average) or fixed (Eq. 3, per image)")
    loss.add_argument("--no-reactivation", action="store_true", help="SViT: M_l <- M_l * M_(l-1)")
    loss.add_argument("--tau", type=float, default=1.0, help="SViT: Gumbel-softmax temperature")
    loss.add_argument("--drop-path", type=float, default=None,
                      help="stochastic depth rate, linear over the blocks (default: detectors 0.1 tiny / 0.2 small "
                           "as the official configs; classifiers 0)")
    data = t.add_argument_group("data")
    options.add(t, data, "--img-size", type=int, defaults={CLS: None},
                help="input size (default: the model's, 224 DeiT/SViT, 32 digits)")
    options.add(t, data, "--split", defaults={DET: "train2017"}, help="COCO split under --data")
    options.add(t, data, "--ann", defaults={DET: None}, help="COCO-format annotation json (with --images)")
    options.add(t, data, "--images", defaults={DET: None}, help="image folder of --ann")
    options.add(t, data, "--img-scale", defaults={DET: None}, help="W,H training scale (default: the model's 1333,800)")
    options.add(t, data, "--flip", type=float, defaults={DET: 0.5}, help="horizontal flip probability")
    options.add(t, data, "--multiscale-crop", action="store_true", defaults={DET: False},
                help="the official multi-scale + random-crop augmentation (short side 480..800, crops of 384..600 px) "
                     "instead of one --img-scale")
    t.add_argument("--num-classes", type=int, default=None, help="model outputs (default: the data's / checkpoint's)")
    run = t.add_argument_group("running")
    run.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    run.add_argument("--workers", type=int, default=2, help="DataLoader processes")
    run.add_argument("--seed", type=int, default=0, help="random seed")
    run.add_argument("--checkpoint-every", type=int, default=0, help="steps (0: end of each epoch)")
    run.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    options.add(t, run, "--no-sync-bn", action="store_true", defaults={DET: False},
                help="under torchrun: BatchNorm statistics per process (default: over all, as SyncBN)")
    t.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from ..inference import family_of

    family = family_of(args.model, None)
    args = options.resolve(args, family, args.model)
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    for flag, value, ok in (("--log-every", args.log_every, args.log_every >= 1),
                            ("--checkpoint-every", args.checkpoint_every, args.checkpoint_every >= 0),
                            ("--workers", args.workers, args.workers >= 0), ("--tau", args.tau, args.tau > 0),
                            ("--ratio-weight", args.ratio_weight, args.ratio_weight >= 0),
                            ("--drop-path", args.drop_path, args.drop_path is None or 0 <= args.drop_path < 1),
                            ("--threads", args.threads, args.threads is None or args.threads >= 1)):
        if not ok:
            raise ValueError(f"{flag} {value} is out of range")
    check_writable(Path(args.out))
    return train_detector(args) if family == DET else train_classifier(args)


def _spec(args: argparse.Namespace, family: str):
    """The ``ModelSpec`` of the flags: the model, where training starts (``--init``), classes, size, seed."""
    from ..inference import ModelSpec

    return ModelSpec(family, args.model, args.init, num_classes=args.num_classes, seed=args.seed,
                     img_size=getattr(args, "img_size", None), img_scale=parse_img_scale(getattr(args, "img_scale", None)))


def _settings(args: argparse.Namespace) -> dict:
    """The ``TrainingConfig`` fields every trainer takes from the flags (None: the config's default)."""
    return {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "gate_lr": args.gate_lr,
            "weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps, "ratio_weight": args.ratio_weight,
            "ratio_loss": args.ratio_loss, "amp": args.amp, "seed": args.seed, "workers": args.workers,
            "checkpoint_every": args.checkpoint_every, "drop_path": args.drop_path}


def train_classifier(args: argparse.Namespace) -> int:
    from ..inference import DataOptions
    from ..training import classifier_training

    if not args.data:
        raise ValueError("--data is required: a labelled ImageFolder tree, parquet or Arrow data set")
    if args.export and Path(args.export).exists() and not Path(args.export).is_dir():
        raise ValueError(f"--export {args.export} exists and is not a folder")
    job = classifier_training(_spec(args, CLS), DataOptions(args.data), run_options(args), args.out,
                              {**_settings(args), "freeze_backbone": args.freeze_backbone},
                              {"reactivation": not args.no_reactivation, "gate_tau": args.tau}, _resuming(args),
                              args.log_every)
    show(job.messages)
    return fit_with_progress(args, job.trainer, lambda e: {"loss": f"{e.loss:.3f}", "ratio": f"{e.ratio_loss:.3f}"})


def train_detector(args: argparse.Namespace) -> int:
    """A detector on COCO-format data (``--data ROOT --split S`` or ``--ann --images``)."""
    from ..data.coco import resolve_coco_paths
    from ..inference import DataOptions
    from ..training import detector_training

    ann_file, image_dir = resolve_coco_paths(args.data, args.split, args.ann, args.images)
    steps = tuple(int(v) for v in args.steps.split(",")) if args.steps else None
    settings = {**_settings(args), "schedule": args.schedule, "steps": steps, "clip_grad": args.clip_grad,
                "sync_bn": not args.no_sync_bn}
    job = detector_training(_spec(args, DET), DataOptions(str(image_dir), annotations=str(ann_file)), run_options(args),
                            args.out, settings, {"reactivation": not args.no_reactivation, "gate_tau": args.tau},
                            _resuming(args), args.log_every, args.flip, args.multiscale_crop)
    show(job.messages)
    return fit_with_progress(args, job.trainer, lambda e: {"loss": f"{e.losses['loss']:.3f}"} if e.losses else {})


def _resuming(args: argparse.Namespace) -> bool:
    return bool(args.resume or (args.out and Path(args.out).exists() and not args.restart))


def fit_with_progress(args: argparse.Namespace, trainer, postfix) -> int:
    """Resume from ``--out``/``--resume`` unless ``--restart``, train with a progress bar (classifiers and
    detectors; the trainer writes ``<out>.log.jsonl`` and the checkpoint). Under torchrun rank 0 alone shows
    the bar."""
    from ..distributed import shutdown

    main_rank = trainer.dist.is_main
    try:
        if _resuming(args):
            path = args.resume or args.out
            notes = trainer.resume(path)
            if main_rank:
                print(f"resumed from {path} at epoch {trainer.epoch} step {trainer.global_step}", file=sys.stderr)
                for text in notes:
                    note(text)
        bar = progress_bar(trainer.cfg.epochs * trainer.steps_per_epoch, "train", "step", main_rank, trainer.global_step)

        def log(entry) -> None:
            post = postfix(entry)
            if post:  # shown with the update, at the bar's pace (a log file gets a line every 30 s)
                bar.set_postfix(**post, skipped=trainer.skipped, refresh=False)
            bar.update(1)

        first = trainer.global_step
        trainer.fit(log=log)
        bar.close()
        if main_rank:
            world = f" on {trainer.dist.world_size} processes" if trainer.dist.world_size > 1 else ""
            done = trainer.global_step - first
            if first and not done:
                print(f"nothing to train: {args.out} has all {trainer.cfg.epochs} epochs (a larger --epochs trains more)")
            else:
                where = f" (steps {first + 1}-{trainer.global_step} of {trainer.global_step})" if first else ""
                print(f"trained {done} steps{where}{world} ({trainer.skipped} unreadable images skipped) -> {args.out}")
            if getattr(args, "export", None):
                from ..checkpoint import save_pretrained

                print(f"exported -> {save_pretrained(trainer.model, args.export)} (model.safetensors, config.json)")
    finally:
        shutdown(trainer.dist)
    return 0
