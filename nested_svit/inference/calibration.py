"""A keep budget without retraining: the gate thresholds of a model (the classifier, or a detector's
backbone) shifted so that the keep fractions on N images of the input hit the targets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..methods.svit import keep_budget


@dataclass(frozen=True)
class KeepBudget:
    """``images``: calibrate on this many decodable images (0: no calibration); ``targets`` (one per
    gate) or ``scale`` (times the model's targets; neither: the model's); ``data``: calibrate on these
    images instead of the input; ``save_to``: write the calibrated model there."""

    images: int = 0
    targets: tuple[float, ...] | None = None
    scale: float | None = None
    data: str | None = None
    save_to: str | None = None

    def __post_init__(self) -> None:
        if (self.targets is not None or self.scale is not None) and not self.images:
            raise ValueError("--keep-targets needs --calibrate N (the number of images to calibrate the gates on)")
        if self.images < 0:
            raise ValueError(f"--calibrate must be >= 1 images, got {self.images}")


def first_decodable(dataset, count: int, key: str = "image") -> list:
    """The first ``count`` decodable items' ``key`` of ``dataset`` (never raising for bad files)."""
    found = []
    for i in range(len(dataset)):
        value = dataset[i][key]
        if value is not None:
            found.append(value)
        if len(found) == count:
            break
    return found


def calibrate(stack, budget: KeepBudget, images_of: Callable[[str | None, int], Sequence[torch.Tensor]],
              device: torch.device | str, source: str, name: str) -> tuple[dict | None, list[str]]:
    """Calibrate ``stack``'s gates as ``budget`` says. ``images_of(source, n)``: the first n decodable
    model inputs of a data source (``budget.data``, else ``source``: the input). -> (what was done, for the
    outputs and the manifest; the lines to show)."""
    if not budget.images:
        return None, []
    if stack.num_gates == 0 or stack.method.calibrate is None:
        raise ValueError(f"{name} has no gates to calibrate (--calibrate shifts SViT gate thresholds; "
                         f"{stack.method.title} keeps its own counts)")
    targets = keep_budget(budget.targets, budget.scale, stack.config.keep_targets)
    data = budget.data or source
    images = images_of(data, budget.images)
    if not images:
        raise ValueError(f"no decodable images in {data} to calibrate on")
    reached = stack.calibrate_keep([t.to(device, stack.dtype) for t in images], targets)
    result = {"images": len(images), "data": str(data), "targets": targets, "reached": [round(r, 4) for r in reached]}
    return result, [f"calibrated gates on {len(images)} images: keep fractions {', '.join(f'{r:.3f}' for r in reached)}"]
