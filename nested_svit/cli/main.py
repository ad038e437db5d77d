"""The ``nested-svit`` parser and entry point: one module per job below (bench, eval, predict, train,
list), each adding its own sub-parser."""
from __future__ import annotations

import argparse
import sys

from . import bench, evaluate, listing, predict, train
from .common import close_bars

class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once: not where the help already says its default, and never a bare None/False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, "", argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


FORMATTER = Formatter


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    parser = argparse.ArgumentParser(prog="nested-svit", formatter_class=FORMATTER, description=(
        "Token-pruned Vision Transformers (SViT) on ragged batches: benchmark, evaluate, predict, train."))
    parser.add_argument("--version", action="version", version=f"nested-svit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for job in (bench, evaluate, predict, train, listing):
        job.add_parser(sub, FORMATTER)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*nested tensors is in prototype stage.*")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        close_bars()
        print("interrupted: finished batches are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, RuntimeError) as e:
        close_bars()
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
