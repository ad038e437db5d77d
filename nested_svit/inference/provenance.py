"""What every output of a run records about where its rows came from: the model, its checkpoint (path,
sha256, format, whether its keep budget was calibrated), the transform, precision and backend, the
package version and source commit, the date."""
from __future__ import annotations

import datetime

from ..devices import kernel_settings
from ..version import __version__, source_commit
from .spec import BuiltModel, ModelSpec


def provenance(built: BuiltModel, spec: ModelSpec, **extra) -> dict:
    """Plain data for ``<out>.meta.json`` and the parquet schema metadata; ``extra``: what the run adds
    (transform, data, calibration, ...)."""
    report = built.report
    return {"model": built.name, "family": spec.family, "checkpoint": spec.checkpoint,
            "checkpoint_sha256": report.sha256 if report else None, "checkpoint_format": report.format if report else None,
            "checkpoint_notes": list(report.notes) if report else [],
            "random_weights": report is None, "precision": spec.precision, "backend": built.backend,
            "agreement_with": spec.agreement_with,
            "compile": spec.compile, "capacity": spec.capacity, "cuda_graphs": spec.cuda_graphs, **extra,
            "kernel_settings": kernel_settings(), "nested_svit_version": __version__, "source_commit": source_commit(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
