"""Offline prediction on Ray Data (``predict --engine ray``), an optional extra: ``pip install -e '.[ray]'``.
Nothing else in nested_svit imports this package; the CLI does when asked to.

The engine is a schedule of the one inference loop (``inference.run_batches``): the driver lists the
batches that have no part file yet; a CPU task per batch reads and decodes it with the local data set
and collate code (bad files become rows with their reason, never errors); model actors, each building
the model once from the run's ``ModelSpec``, run it with the job's own batch step; the driver commits
each batch's part file as it arrives (the local engine's commit path) and, at the end, checks that the
parts cover every image exactly once and writes the output as the local path does.
Same batches and same code, so the rows equal the local engine's; a batch lost with an actor is
retried by Ray; a killed driver resumes from the committed parts (the run record refuses other inputs).
"""
from __future__ import annotations


def require_ray():
    """The ``ray`` module, or an ImportError saying how to get it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError("--engine ray needs Ray Data: pip install -e '.[ray]' (ray[data]==2.60.0)") from e
    return ray


__all__ = ["require_ray"]
