"""FLOPs of an arbitrary forward, counted by ``torch.utils.flop_counter`` (matmuls, convolutions,
attention). This torch's CPU attention kernel has no formula there; it is registered here with the
same count as the CUDA kernels (4 * N_q * N_k * D per head). Element-wise ops, LayerNorm/BN, softmax,
grid_sample / gather sampling, roi_align, NMS and mask pasting are not counted."""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from ..attention import countable

_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        @register_flop_formula(op, get_raw=True)
        def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
            return sdpa_flop_count(query.shape, key.shape, value.shape)
    _REGISTERED = True


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of ``fn()``, with any attention backend (jagged and varlen attention
    are counted as the per-image SDPA they compute: ``attention.countable``)."""
    _register()
    with FlopCounterMode(display=False) as counter, countable():
        fn()
    return int(counter.get_total_flops())
