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

    from .benchmark import BenchConfig, run_benchmark

    cfg = BenchConfig(models=_csv_list(args.models), batch_sizes=_int_list(args.batch_sizes), device=args.device,
                      threads=args.threads, precision=args.precision, backends=_csv_list(args.backend),
                      input=args.input, img_size=args.img_size, rounds=args.rounds, warmup=args.warmup,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nested-svit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="throughput vs batch size, dense vs pruned, vs the FLOP ideal")
    b.add_argument("--models", default="deit_small_patch16_224,svit_small",
                   help="comma list; 'timm/<name>' for a timm model (needs timm)")
    b.add_argument("--batch-sizes", default="1,8,32")
    b.add_argument("--device", default="cpu")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    b.add_argument("--backend", default="auto", help="comma list of attention backends: auto,loop,padded,nested,varlen")
    b.add_argument("--input", default="synthetic", help="'synthetic' or a directory of images")
    b.add_argument("--img-size", type=int, default=224)
    b.add_argument("--rounds", type=int, default=10)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--no-calibrate", action="store_true", help="leave gates as loaded (trained checkpoints)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default="bench-results.csv", help=".csv or .json")
    b.add_argument("--plot", default="bench-throughput.png", help="PNG path ('' for none)")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
