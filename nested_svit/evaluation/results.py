"""What every evaluation result records besides its metrics: the checkpoint (path, sha256, format, the
loader's notes) and the run (device, processes, backend, kernel settings, versions)."""
from __future__ import annotations

import torch

from ..devices import kernel_settings
from ..version import __version__, source_commit


def checkpoint_record(model_name: str, checkpoint: str | None, report) -> dict:
    """``model``, ``checkpoint``, ``checkpoint_sha256``, ``checkpoint_format``, ``checkpoint_notes``
    (``report``: the ``LoadReport``, None for random weights)."""
    return {"model": model_name, "checkpoint": str(checkpoint) if checkpoint else None,
            "checkpoint_sha256": report.sha256 if report else None,
            "checkpoint_format": report.format if report else None,
            "checkpoint_notes": list(report.notes) if report else []}


def run_record(device, world_size: int, backend: str) -> dict:
    """``device``, ``world_size``, ``backend``, ``kernel_settings``, ``torch_version``, ``version``,
    ``source_commit``."""
    return {"world_size": world_size, "device": str(device), "backend": backend, "kernel_settings": kernel_settings(),
            "torch_version": torch.__version__, "version": __version__, "source_commit": source_commit()}
