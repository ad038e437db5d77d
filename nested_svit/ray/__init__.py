"""Offline prediction on Ray Data (``predict --engine ray``), an optional extra: ``pip install -e '.[ray]'``.
Nothing else in nested_svit imports this package; the CLI does when asked to.

The engine runs the local job's own global batches (``evaluation.runner``): the driver lists the
batches that have no part file yet; a CPU task per batch reads and decodes it with the local data set
and collate code (bad files become rows with their reason, never errors); model actors, each loading
the model once from the checkpoint path, run it with the local per-batch code (``classify_batch`` /
``detect_batch``); the driver writes each batch's part file atomically as it arrives and, at the end,
checks that the parts cover every image exactly once and writes the output as the local path does.
Same batches and same code, so the rows equal the local engine's; a batch lost with an actor is
retried by Ray; a killed driver resumes from the committed parts (the manifest refuses other inputs).
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
