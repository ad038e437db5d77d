"""ImageNet-1k class table (index, WordNet id, lemma), shipped with the package."""
from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(wnids, names) in the standard ImageNet-1k index order."""
    text = resources.files("nested_svit.assets").joinpath("imagenet1k_classes.tsv").read_text()
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    return tuple(r[1] for r in rows), tuple(r[2] for r in rows)


def imagenet_index(wnids: list[str]) -> dict[str, int] | None:
    """Map class directories named by ImageNet wnids (all or a subset) to standard indices;
    None if any directory is not an ImageNet-1k wnid."""
    table = {w: i for i, w in enumerate(imagenet_classes()[0])}
    return {w: table[w] for w in wnids} if wnids and all(w in table for w in wnids) else None


_WNID_IN_NAME = re.compile(r"_(n\d{8})\.[A-Za-z]+$")


def wnids_in_names(names: list[str]) -> list[int] | None:
    """ImageNet labels of files named ``<anything>_<wnid>.<ext>`` (Hugging Face's ImageNet val files,
    ``ILSVRC2012_val_00000001_n01440764.JPEG``), when every name carries an ImageNet-1k wnid; else None."""
    found = [_WNID_IN_NAME.search(n) for n in names]
    if not names or not all(found):
        return None
    index = imagenet_index(sorted({m.group(1) for m in found}))
    return None if index is None else [index[m.group(1)] for m in found]
