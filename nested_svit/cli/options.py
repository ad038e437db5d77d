"""Options whose meaning or default depends on the model family (classifier or detector).

They are parsed with no default (``argparse.SUPPRESS``), so "was this flag given?" is whether the
parsed namespace has it. Once the command knows the family (``--model``, or what ``--checkpoint``
holds), ``resolve`` refuses every given flag that does not apply to that family, in one line, and
fills in the family's default (taken from the config dataclasses by the caller)."""
from __future__ import annotations

import argparse
from typing import Any

FAMILIES = ("classifier", "detector")
_TABLE = "_family_options"  # namespace attribute: {dest: (flag, {family: default})}


def _describe(defaults: dict[str, Any], families: tuple[str, ...]) -> str:
    """``; classifiers only (default: 5)``, ``(default: classifiers 128, detectors 2)``, ``(default: 2)``."""
    shown = {f: v for f, v in defaults.items() if f in families}
    only = f"; {next(iter(shown))}s only" if len(shown) < len(families) else ""
    values = set(map(repr, shown.values()))
    if len(values) == 1:
        value = next(iter(shown.values()))
        return only + ("" if value is None or value is False else f" (default: {value})")
    given = {f: v for f, v in shown.items() if v is not None and v is not False}  # None: the help says how
    return " (default: " + ", ".join(f"{f}s {v}" for f, v in given.items()) + ")" if given else ""


def add(parser: argparse.ArgumentParser, group, *flags: str, defaults: dict[str, Any], help: str,
        families: tuple[str, ...] = FAMILIES, **kwargs) -> None:
    """``group.add_argument(*flags, ...)`` for the families in ``defaults`` (family -> default; None
    where the command works it out), on a parser of ``families``; the help says which families it
    applies to and their defaults. Not added where it applies to none of the parser's families."""
    if not set(defaults) & set(families):
        return
    action = group.add_argument(*flags, default=argparse.SUPPRESS, help=help + _describe(defaults, families), **kwargs)
    table = dict(parser.get_default(_TABLE) or {})
    table[action.dest] = (flags[0], dict(defaults))
    parser.set_defaults(**{_TABLE: table})


def resolve(args: argparse.Namespace, family: str, model: str | None) -> argparse.Namespace:
    """The second half of parsing, once the family is known: refuse any given option that does not apply
    to ``family``; -> a new namespace with the family's defaults filled in (``args`` is left as it is)."""
    table = getattr(args, _TABLE, {}) or {}
    foreign = [flag for dest, (flag, defaults) in table.items() if family not in defaults and hasattr(args, dest)]
    if foreign:
        other = "classifiers" if family == "detector" else "detectors"
        verb = "apply" if len(foreign) > 1 else "applies"
        raise ValueError(f"{', '.join(foreign)} only {verb} to {other}; {model or 'this model'} is a {family}")
    values = dict(vars(args))
    for dest, (_, defaults) in table.items():
        if family in defaults and dest not in values:
            values[dest] = defaults[family]
    values["family"] = family
    return argparse.Namespace(**values)
