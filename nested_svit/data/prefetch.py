"""Batches moved to the model's device one step ahead (as timm's ``PrefetchLoader``): while the model
runs batch ``i``, batch ``i + 1`` is copied from pinned memory with ``non_blocking`` and prepared
(decoded, normalised) on a side stream (real CUDA; elsewhere in order, the same code)."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

from torch import Tensor

from ..devices import hand_over, on_stream, side_stream


def _tensors(batch) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    out = []
    for v in values:
        if isinstance(v, Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(t for t in v if isinstance(t, Tensor))
    return out


def prefetched(batches: Iterable, device, prepare: Callable[[object], object]) -> Iterator:
    """``prepare(batch)`` (moves it to ``device``) of each batch, the next one issued before the
    current one is handed to the caller. Tensors ``prepare`` makes stay valid for the caller's stream."""
    stream = side_stream(device)
    it = iter(batches)

    def load(raw):
        with on_stream(stream):
            return prepare(raw)

    try:
        ahead = load(next(it))
    except StopIteration:
        return
    for raw in it:
        hand_over(stream, _tensors(ahead))
        current, ahead = ahead, load(raw)
        yield current
    hand_over(stream, _tensors(ahead))
    yield ahead
