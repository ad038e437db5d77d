"""BatchNorm over a ragged batch: statistics of all images together although they have different sizes
and run through the spatial layers one image (or one size group) at a time.

mmdet trains the adapter's BatchNorms as SyncBN over every image of every GPU (images padded to the
batch's largest size). ``ragged_batch_norm`` gives the same statistics over the images' own (/32-padded)
pixels: over this process's batch, or over all ranks with ``sync=True`` (autograd flows through the
all-reduce, as in ``nn.SyncBatchNorm``). In eval mode it is the layer itself, per tensor.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _all_reduce(t: Tensor) -> Tensor:
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)


def ragged_batch_norm(bn: nn.BatchNorm2d, xs: Sequence[Tensor], sync: bool = False) -> list[Tensor]:
    """``xs``: tensors ``[G_i, C, H_i, W_i]`` -> normalised tensors of the same shapes. In training,
    mean and (biased) variance are taken over every pixel of every tensor (and every rank with ``sync``),
    and the running statistics are updated once, with the unbiased variance, as ``nn.BatchNorm2d``."""
    if not (bn.training or bn.running_mean is None):
        return [bn(x) for x in xs]
    sync = sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    c = bn.num_features
    flat = [x.transpose(0, 1).reshape(c, -1) for x in xs]
    total = torch.stack([f.sum(1) for f in flat]).sum(0)
    count = torch.tensor([float(sum(f.shape[1] for f in flat))], device=total.device, dtype=total.dtype)
    if sync:
        total, count = _all_reduce(total), _all_reduce(count)
    mean = total / count
    sq = torch.stack([(f - mean[:, None]).pow(2).sum(1) for f in flat]).sum(0)
    if sync:
        sq = _all_reduce(sq)
    var = sq / count
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            n = float(count.item())
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked + 1)
            bn.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
            bn.running_var.mul_(1 - momentum).add_(momentum * var.detach() * n / max(n - 1, 1))
            bn.num_batches_tracked.add_(1)
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    return [x * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1) for x in xs]


def apply_layer(layer: nn.Module, xs: Sequence[Tensor], sync: bool = False) -> list[Tensor]:
    """``layer`` on every tensor of ``xs``; a BatchNorm sees them all at once (``ragged_batch_norm``)."""
    if isinstance(layer, nn.BatchNorm2d):
        return ragged_batch_norm(layer, xs, sync)
    return [layer(x) for x in xs]
