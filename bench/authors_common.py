"""What the ``authors_*.py`` comparisons share: timm's random DeiT weights with a class token and
position embedding that matter, and the CSV they write."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Iterable

import timm
import torch


def deit_state(size: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A ``deit_{size}_patch16_224`` state dict as timm initialises it, class token and position
    embedding drawn with std 0.5 (timm's are near zero, which would hide the class token's role)."""
    torch.manual_seed(seed)
    state = timm.create_model(f"deit_{size}_patch16_224", pretrained=False).state_dict()
    state["cls_token"].normal_(std=0.5)
    state["pos_embed"].normal_(std=0.5)
    return state


def run_rows(jobs: Iterable[Callable[[], dict]], out: Path) -> int:
    """Each job (-> one row) run and printed as it finishes, then all rows written to ``out``."""
    rows = []
    for job in jobs:
        rows.append(job())
        print(rows[-1], flush=True)
    write_rows(rows, out)
    return 0


def write_rows(rows: list[dict], out: Path) -> None:
    """``rows`` (one dict per compared model) as a CSV at ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
