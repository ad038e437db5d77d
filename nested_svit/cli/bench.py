"""``nested-svit bench``: throughput against batch size, dense vs pruned, against the FLOP ideal; classifier
sweeps (``benchmark/harness.py``) or detector FPS^w / FPS^b sweeps (``benchmark/detection.py``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import options
from .arguments import CLS, DET
from .common import check_suffix, check_writable, csv_list, int_list, keep_budget_values, note, parse_img_scale


def add_parser(sub, formatter) -> None:
    from ..benchmark.detection import DetBenchConfig
    from ..benchmark.harness import BenchConfig

    cls, det = BenchConfig(), DetBenchConfig()
    about = ("throughput vs batch size, dense vs pruned, vs the FLOP ideal: classifier sweeps, or detector "
             "FPS^w / FPS^b sweeps on mixed-size batches")
    b = sub.add_parser("bench", help=about, description=about, formatter_class=formatter)
    b.add_argument("--models", default=None,
                   help="comma list of classifiers ('timm/<name>' for a timm model, needs timm; "
                        "'openvino/<dense name>', 'onnxruntime/<dense name>' for that dense model's weights on that "
                        "runtime, needs nested-svit[peers]) or of detectors (default: deit_small_patch16_224,svit_small)")
    b.add_argument("--checkpoint", default=None,
                   help="measure the trained classifier this file describes (its own gates and keep ratios, not "
                        "calibrated unless --keep-targets) beside its dense counterpart, instead of --models")
    options.add(b, b, "--batch-sizes", defaults={CLS: ",".join(map(str, cls.batch_sizes)),
                                                 DET: ",".join(map(str, det.batch_sizes))}, help="comma list")
    b.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    options.add(b, b, "--precision", defaults={CLS: cls.precision},
                help="fp32, bf16, fp16, int8 (CPU, ours only), or a comma list timed side by side (fp32,bf16,int8): "
                     "ours run reduced precision with every decision in fp32; each row reports its decision "
                     "agreement with fp32")
    options.add(b, b, "--no-agreement", action="store_true", defaults={CLS: False},
                help="skip the decision agreement columns (against fp32, and each image against itself alone)")
    options.add(b, b, "--backend", defaults={CLS: "auto"},
                help="comma list of attention backends: auto,loop,padded,nested,varlen")
    b.add_argument("--input", default="synthetic", help="'synthetic' or a directory of images")
    options.add(b, b, "--img-size", type=int, defaults={CLS: None}, help="input size (default: the model's)")
    options.add(b, b, "--img-scale", defaults={DET: ",".join(map(str, det.img_scale))}, help="W,H test scale")
    options.add(b, b, "--rounds", type=int, defaults={CLS: cls.rounds, DET: det.rounds},
                help="timed interleaved rounds per batch size")
    options.add(b, b, "--min-time", type=float, defaults={CLS: cls.min_time},
                help="more rounds at small batches: each runner is timed for at least this many seconds")
    options.add(b, b, "--warmup", type=int, defaults={CLS: cls.warmup, DET: det.warmup}, help="untimed calls per runner first")
    b.add_argument("--no-calibrate", action="store_true",
                   help="leave random selectors as built (the default with --checkpoint: its trained gates)")
    options.add(b, b, "--keep-targets", defaults={CLS: None},
                help="calibrate SViT gates to these 9 fractions, or scale the model's by one factor")
    b.add_argument("--seed", type=int, default=0, help="random seed")
    b.add_argument("--compile", action="store_true",
                   help="classifiers: also time every model compiled, side by side (timm's by torch.compile of the "
                        "whole model, ours by compiled blocks); speed-ups compare compiled with compiled dense")
    b.add_argument("--out", default="bench-results.csv", help=".csv or .json")
    b.add_argument("--plot", default=None,
                   help="PNG path ('' for none; default: beside --out, with .png for its suffix)")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from ..inference import family_of

    if args.checkpoint and args.models:
        raise ValueError("give --models or --checkpoint (which measures the model the file describes), not both")
    if args.checkpoint and family_of(None, args.checkpoint) == DET:
        raise ValueError("bench --checkpoint measures classifiers; for a detector give --models")
    models = csv_list(args.models or "deit_small_patch16_224,svit_small") if not args.checkpoint else ["svit_small"]
    if not models:
        raise ValueError("--models: give at least one model")
    families = {family_of(m, None) for m in models}
    if len(families) > 1:
        raise ValueError("bench either classifiers or detectors in one run, not both")
    detectors = families == {DET}
    args = options.resolve(args, DET if detectors else CLS, models[0])
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads} (leave it out for torch's default)")
    out = Path(args.out)
    check_suffix(out, (".csv", ".json"), "bench")
    check_writable(out)
    if args.plot is None:
        args.plot = str(out.with_suffix(".png"))
    if args.plot:
        check_writable(Path(args.plot))
    batch_sizes = int_list(args.batch_sizes)
    df, cols = (_bench_detectors if detectors else _bench_classifiers)(args, models, batch_sizes)
    from ..benchmark.outputs import write_bench

    write_bench(df, out, args.plot, detectors)
    print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _keep_budget(value: str | None, models: list[str]) -> dict:
    """``--keep-targets`` as ``BenchConfig`` fields (``keep_targets`` or ``keep_scale``), for models whose
    gates calibrate; refused for a pruned model that keeps its own counts."""
    from ..methods import get_method
    from ..registry import get_config

    values = keep_budget_values(value)
    for name in models if values else ():
        cfg = get_config(name)
        method = get_method(cfg.method)
        if cfg.gate_blocks and method.calibrate is None:
            raise ValueError(f"--keep-targets calibrates SViT gates; {name} ({method.title}) keeps its own token counts")
    return {"keep_targets": values.get("targets"), "keep_scale": values.get("scale")}


def _bench_classifiers(args: argparse.Namespace, models: list[str], batch_sizes: list[int]):
    from ..benchmark import BenchConfig, run_benchmark
    from ..benchmark.harness import TIMM_PREFIX
    from ..benchmark.peers import split_name
    from ..devices import native_bf16, resolve_device
    from ..inference.spec import BF16_MEASURED
    from ..registry import get_config
    from .common import progress_bar

    ours = [(split_name(m) or (None, m))[1] for m in models if not m.startswith(TIMM_PREFIX)]
    for m in ours:
        get_config(m)  # unknown names fail now, with the list of models
    calibrate = not args.no_calibrate and (not args.checkpoint or args.keep_targets is not None)
    if args.checkpoint and args.input == "synthetic":
        note("--checkpoint on synthetic noise: its keep ratios (and so its speed) are the model's on noise; "
             "--input DIR measures them on your images")
    cfg = BenchConfig(models=models, batch_sizes=batch_sizes, device=resolve_device(args.device),
                      threads=args.threads, precision=args.precision, backends=csv_list(args.backend),
                      input=args.input, img_size=args.img_size, rounds=args.rounds, min_time=args.min_time,
                      warmup=args.warmup, calibrate=calibrate, seed=args.seed, checkpoint=args.checkpoint,
                      compile=args.compile, agreement=not args.no_agreement,
                      **_keep_budget(args.keep_targets, [] if args.checkpoint else ours))
    # cfg.precisions refuses a bad name in one line, before the progress bar
    if cfg.precisions == ["fp32"] and native_bf16(cfg.device):
        note(f"this CPU computes bf16 natively: {BF16_MEASURED} (--precision fp32,bf16 times both)")
    bar = progress_bar(len(batch_sizes), "bench", "batch size")

    def progress(event) -> None:  # a BenchProgress before each timed round
        bar.n = event.step
        bar.set_postfix_str(str(event), refresh=False)
        bar.update(0)  # drawn at the bar's pace: a log file gets a line every 30 s, not one per round

    df = run_benchmark(cfg, progress)
    bar.n = len(batch_sizes)
    bar.close()
    agree = [] if args.no_agreement else ["agree_fp32_kept", "agree_fp32_top1", "alone_kept", "alone_top1"]
    return df, ["model", "runtime", "precision", "backend", "compiled", "batch_size", "infer_samples_per_sec",
                "mean_kept_tokens", "gmacs_per_image", "ideal_speedup", "speedup", "efficiency",
                "speedup_vs_fastest_dense", "efficiency_vs_fastest_dense", *agree]


def _bench_detectors(args: argparse.Namespace, models: list[str], batch_sizes: list[int]):
    from ..benchmark.detection import DetBenchConfig, run_detection_benchmark
    from ..detection.registry import dense_detector
    from ..devices import resolve_device
    from .common import progress_bar

    if args.compile:
        raise ValueError("--compile times classifiers only so far; detectors' compiled backbone is checked in the "
                         "tests (predict/eval --compile), not yet benchmarked")

    cfg = DetBenchConfig(models=models, batch_sizes=batch_sizes, img_scale=parse_img_scale(args.img_scale),
                         device=resolve_device(args.device), threads=args.threads, rounds=args.rounds,
                         warmup=args.warmup, calibrate=not args.no_calibrate, seed=args.seed, input=args.input)
    total = len(cfg.batch_sizes) * cfg.rounds * 2 * len(set(models) | {dense_detector(m) for m in models})
    bar = progress_bar(total, "bench", "call")

    def progress(event) -> None:  # a BenchProgress before each timed call
        bar.total = event.steps
        bar.n = event.step + 1
        bar.set_postfix_str(str(event), refresh=False)
        bar.update(0)

    df = run_detection_benchmark(cfg, progress)
    bar.close()
    return df, ["model", "part", "batch_size", "images_per_sec", "time_per_image_ms", "gmacs_per_image",
                "ideal_speedup", "speedup", "efficiency", "mean_keep_ratio", "peak_mem_mb"]
