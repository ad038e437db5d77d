"""``eval imagenet --data [NAME=]PATH[:real=FILE][:valid=SET]``, given once or several times: the test
sets of a run, each with its name and its own scoring flags."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataSetArg:
    """One ``--data [NAME=]PATH[:real=FILE][:valid=SET]``: its name (None: a plain PATH), path and
    scoring flags (None: the run's ``--real-labels`` / ``--valid-labels``; ``none``: off for this set)."""

    name: str | None
    path: str
    real: str | None = None
    valid: str | None = None

    @property
    def label(self) -> str:
        """What results call the set: its name, else its folder's."""
        return self.name or Path(self.path.rstrip("/")).name


SET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
SET_OPTION = re.compile(r":(real|valid)=")


def parse_data_set(text: str) -> DataSetArg:
    """``[NAME=]PATH[:real=FILE][:valid=SET]`` -> ``DataSetArg``; an existing path is always a plain PATH."""
    name = None
    head, sep, rest = text.partition("=")
    if sep and SET_NAME.fullmatch(head) and not Path(text).exists():
        name, text = head, rest
    found = SET_OPTION.search(text)
    if not found or Path(text).exists():
        return DataSetArg(name, text)
    path, values = text[:found.start()], {}
    marks = list(SET_OPTION.finditer(text))
    for mark, after in zip(marks, marks[1:] + [None]):
        if mark.group(1) in values:
            raise ValueError(f"--data {text}: :{mark.group(1)}= given twice")
        values[mark.group(1)] = text[mark.end():after.start() if after else len(text)]
    if not path:
        raise ValueError(f"--data {text}: no PATH before :{marks[0].group(1)}=")
    return DataSetArg(name, path, values.get("real"), values.get("valid"))


def data_sets(args: argparse.Namespace) -> list[DataSetArg]:
    """The ``--data`` sets of a run, each with its names unique (a plain PATH among several is named by
    its folder) and its scoring resolved (its own, else the run's flags; ``none``: off)."""
    sets = [parse_data_set(t) for t in args.data]
    several = len(sets) > 1
    out, seen = [], set()
    for s in sets:
        name = s.label if several else s.name
        if several and not SET_NAME.fullmatch(name or ""):
            raise ValueError(f"--data {s.path}: name it (--data NAME={s.path}; NAME: letters, digits, _ and -)")
        if name in seen:
            raise ValueError(f"two --data sets are named {name!r}: give each its own name (--data NAME=PATH)")
        seen.add(name)
        real = s.real if s.real is not None else args.real_labels
        valid = s.valid if s.valid is not None else args.valid_labels
        if real == "" or valid == "":
            what = "valid-labels (imagenet-a, imagenet-r, a file or none)" if valid == "" else "real-labels (a file or none)"
            raise ValueError(f"--data {s.path}: the {what.split(' ')[0]} value is empty: give {what}")
        out.append(DataSetArg(name, s.path, None if real == "none" else real, None if valid == "none" else valid))
    return out
