"""Peak memory of the tensors a forward creates, device-agnostic.

CUDA: ``torch.cuda.max_memory_allocated``. CPU has no allocator statistics, so a dispatch mode
follows every tensor storage an op creates until its last tensor is freed; weights and inputs,
created before, are not counted. The same measure for every model, so peaks compare.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..devices import cuda_peak_mb, is_real_cuda


class _StorageTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage ptr -> [live tensors, nbytes]

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.is_nested:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            entry = self._refs.get(key)
            if entry is None:
                entry = self._refs[key] = [0, storage.nbytes()]
                self.current += entry[1]
                self.peak = max(self.peak, self.current)
            entry[0] += 1
            weakref.finalize(t, self._release, key)
        return out


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak MiB of memory allocated by ``fn()`` beyond what existed before."""
    if is_real_cuda(device):
        return cuda_peak_mb(fn, device)
    tracker = _StorageTracker()
    with tracker:
        result = fn()
    del result
    return tracker.peak / 2**20
