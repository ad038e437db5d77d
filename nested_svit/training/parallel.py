"""Data-parallel training under torchrun, shared by the classifier and detector trainers.

Each global batch of ``batch_size`` images (the same batches a single process would see) is split into
``world_size`` equal shards, ``batch[rank::world_size]``. Every rank computes its loss on its shard;
gradients are averaged over the ranks that had readable images, with one ``all_reduce`` of a flat buffer
per step, so a rank whose shard was all unreadable still takes part (and nobody waits forever). Random
draws (Gumbel noise, drop-path) are seeded per (seed, step, rank) (``seeding.step_seed``), which also
makes a resumed run exact at any world size. Buffers (BatchNorm running statistics) follow rank 0 each
step, as DDP's ``broadcast_buffers`` does (``distributed.broadcast_state``).

Why not ``DistributedDataParallel`` (every model now has a ``forward`` for training, the detector's
returning its losses): a step in which some rank has no readable image cannot join DDP's all-reduce in
backward, and a parameter no rank used in a step (a mask head without positive RoIs) keeps ``None`` here,
so AdamW leaves it alone, where DDP would hand it zeros that weight decay then acts on; both would end
the equality with a single process that the tests hold. One flat all-reduce after backward is simple
and exact; it does not overlap communication with backward (not measured: no multi-GPU machine here).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..distributed import DistInfo


def shard(batch: list[int], info: DistInfo) -> list[int]:
    """This rank's share of a global batch of indices."""
    return batch[info.rank::info.world_size]


def average_gradients(params: list[Tensor], info: DistInfo, has_data: bool, extras: tuple[float, ...] = ()
                      ) -> tuple[int, list[float]]:
    """Average ``.grad`` over the ranks with data (``has_data``) in place; a parameter without a gradient
    on every rank keeps ``None``. ``extras`` are summed over the ranks. -> (ranks with data, summed extras)."""
    if info.world_size <= 1:
        return int(has_data), list(extras)
    device = params[0].device
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=device, dtype=p.dtype)
             for p in params]
    flags = torch.tensor([float(p.grad is not None) for p in params] + [float(has_data), *extras],
                         device=device, dtype=torch.float64)
    flat = torch.cat(grads) if grads else torch.zeros(0, device=device)
    if not has_data:
        flat.zero_()
    dist.all_reduce(flat)
    dist.all_reduce(flags)
    ranks_with_data = int(flags[len(params)].item())
    offset = 0
    for p, had_grad in zip(params, flags[:len(params)].tolist()):
        n = p.numel()
        if had_grad:
            p.grad = (flat[offset:offset + n] / max(ranks_with_data, 1)).view_as(p).to(p.dtype)
        else:
            p.grad = None
        offset += n
    return ranks_with_data, flags[len(params) + 1:].tolist()
