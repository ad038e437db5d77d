"""What the ImageNet test sets' authors score by, as data: the 200-class subsets of ImageNet-A and
ImageNet-R (``valid_labels``: the class indices a model's top-k is restricted to, timm's
``--valid-labels``), the ReaL labels (``read_real_labels``: the valid classes of each val file, by file
name) and ImageNet-V2's index-named class folders (``index_folder_labels``)."""
from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .classes import imagenet_index

# the named 200-class sets: their WordNet ids ship in ``assets`` as their authors publish them
NAMED_SUBSETS = {"imagenet-a": "imagenet_a_wnids.txt", "imagenet-r": "imagenet_r_wnids.txt"}


@lru_cache(maxsize=None)
def subset_wnids(name: str) -> tuple[str, ...]:
    """The WordNet ids of a named set (``NAMED_SUBSETS``), in ImageNet index order."""
    text = resources.files("nested_svit.assets").joinpath(NAMED_SUBSETS[name]).read_text()
    return tuple(ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#"))


def valid_labels(spec: str, num_classes: int) -> tuple[int, ...]:
    """``--valid-labels``: a named set (``imagenet-a``, ``imagenet-r``: ImageNet-1k indices) or a text
    file of class indices, one a line (``#`` comments) -> the sorted indices; a ValueError (one line) for
    an unknown name, a line that is no index, an index outside the model's classes, or one given twice."""
    if spec in NAMED_SUBSETS:
        indices = sorted(imagenet_index(list(subset_wnids(spec))).values())
        if num_classes != 1000:
            raise ValueError(f"--valid-labels {spec}: its indices are ImageNet-1k's, the model has {num_classes} classes")
        return tuple(indices)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--valid-labels {spec!r}: not a named set ({', '.join(NAMED_SUBSETS)}) and no such file "
                         "(a text file of class indices, one a line)")
    indices: dict[int, int] = {}  # index -> the line it is on
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#")[0].strip()
        if not text:
            continue
        try:
            index = int(text)
        except ValueError:
            raise ValueError(f"--valid-labels {spec}: line {number} ({text!r}) is not a class index") from None
        if not 0 <= index < num_classes:
            raise ValueError(f"--valid-labels {spec}: index {index} (line {number}) is outside the model's "
                             f"{num_classes} classes (0..{num_classes - 1})")
        if index in indices:  # a list with a class twice is not the list its author meant: said, not merged
            raise ValueError(f"--valid-labels {spec}: index {index} is on lines {indices[index]} and {number}; give each "
                             "class once")
        indices[index] = number
    if not indices:
        raise ValueError(f"--valid-labels {spec}: the file lists no class index")
    return tuple(sorted(indices))


def matching_subset(folders: set[str]) -> str | None:
    """The named set whose WordNet ids are exactly ``folders`` (an input's class folders), else None."""
    for name in NAMED_SUBSETS:
        if folders == set(subset_wnids(name)):
            return name
    return None


def real_file_name(position: int) -> str:
    """The val file entry ``position`` of ``real.json`` describes: ``ILSVRC2012_val_{position+1:08d}.JPEG``."""
    return f"ILSVRC2012_val_{position + 1:08d}.JPEG"


VAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})(?![0-9])")


def real_name(path: str) -> str | None:
    """The ReaL name of an ImageNet val file wherever it sits and however a copy renamed its tail
    (``ILSVRC2012_val_00000001.JPEG``, Hugging Face's ``ILSVRC2012_val_00000001_n01751748.JPEG``, a
    ``.png`` conversion): ``ILSVRC2012_val_{n:08d}.JPEG``; None for any other file name."""
    found = VAL_FILE.match(Path(str(path)).name)
    return f"ILSVRC2012_val_{found.group(1)}.JPEG" if found else None


def read_real_labels(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The official ``real.json`` (entry ``i``: the valid class indices of ``real_file_name(i)``, maybe
    none) -> {file name: indices}; a ValueError (one line) for a file of another shape."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--real-labels {path}: cannot read it as JSON ({e})") from None
    if not isinstance(entries, list) or not all(
            isinstance(e, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in e) for e in entries):
        raise ValueError(f"--real-labels {path}: not a ReaL labels file (a JSON list of lists of class indices, "
                         "one list per val image)")
    return {real_file_name(i): tuple(e) for i, e in enumerate(entries)}


def index_folder_labels(folders: list[str], num_classes: int) -> dict[str, int] | None:
    """ImageNet-V2's layout: every class folder named by a class index (``0`` ... ``999``, no sign or
    leading zero) in ``[0, num_classes)`` -> {folder: index}; any other folder: None."""
    if not folders or not all(f.isdigit() and f.isascii() and str(int(f)) == f for f in folders):
        return None
    index = {f: int(f) for f in folders}
    return index if max(index.values()) < num_classes else None
