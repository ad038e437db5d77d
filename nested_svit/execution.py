"""The three executions of one block on a feature map with a keep mask (DESIGN.md).

Each takes the full feature map ``x`` (packed ``[T, C]``), the block, ``keep`` (``[T]``: bool, or
float {0, 1} for ``masked``; ``None`` = every token) and ``counts`` (``[B]`` kept per image, or
``None``) and returns the new feature map.
Tokens not kept keep their previous values (preserve), so any later gate may pick them again.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .attention import DenseContext, KeyMaskedContext, VarlenContext
from .layers import Block
from .tokens import Packed, gather, scatter

EXECUTIONS = ("packed", "masked", "reference")


def run_packed(block: Block, x: Packed, keep: Tensor | None, backend: str, counts: Tensor | None = None) -> Packed:
    """Gather the active tokens of all images, run the block once on ``[T_active, C]`` with
    variable-length attention, scatter back. No compute on pruned tokens."""
    active = gather(x, keep, counts)
    out = block(active.values, VarlenContext(active.layout, backend))
    return scatter(x, active.with_values(out), inplace=not torch.is_grad_enabled())


def run_reference(block: Block, x: Packed, keep: Tensor | None, backend: str, counts: Tensor | None = None) -> Packed:
    """Per-image loop: each image's kept tokens through the plain block as a batch of one."""
    out = x.values.clone()
    for start, length in zip(x.layout.starts, x.layout.lengths):
        rows = torch.arange(start, start + length, device=x.values.device)
        if keep is not None:
            rows = rows[keep[start:start + length].bool()]
        if rows.numel():
            out[rows] = block(x.values[rows].unsqueeze(0), DenseContext())[0]
    return Packed(out, x.layout)


def run_masked(block: Block, x: Packed, keep: Tensor | None, backend: str, counts: Tensor | None = None) -> Packed:
    """Training path (Eq. 1): dense ``[B, N, C]``; pruned keys masked out of every softmax;
    output ``M * block(x) + (1 - M) * x`` (differentiable in ``M``). Images of different token
    counts (mixed resolutions) run as one dense batch per image."""
    if not x.layout.is_uniform:
        parts = [_masked_dense(block, part.unsqueeze(0), None if keep is None else keep[s:s + n].unsqueeze(0))[0]
                 for part, s, n in zip(x.unbind(), x.layout.starts, x.layout.lengths)]
        return Packed(torch.cat(parts, 0), x.layout)
    dense = x.to_dense()
    mask = None if keep is None else keep.view(dense.shape[:2])
    return Packed.from_dense(_masked_dense(block, dense, mask))


def _masked_dense(block: Block, dense: Tensor, keep: Tensor | None) -> Tensor:
    """``dense [B, N, C]``, ``keep [B, N]`` (bool or float {0,1}, or None) -> ``[B, N, C]``."""
    if keep is None:
        return block(dense, DenseContext())
    mask = keep.to(dense.dtype)
    out = block(dense, KeyMaskedContext(mask))
    m = mask.unsqueeze(-1)
    return m * out + (1 - m) * dense


RUNNERS: dict[str, Callable[..., Packed]] = {
    "packed": run_packed, "masked": run_masked, "reference": run_reference,
}
