"""ImageNet-1k class table (index, WordNet id, lemma), shipped with the package."""
from __future__ import annotations

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
