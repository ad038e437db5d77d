"""Run under torchrun by tests/test_batchnorm.py: each rank normalises its own ragged tensors with
``ragged_batch_norm(sync=True)`` and writes outputs, input gradients and running stats to ``out.<rank>``."""
from __future__ import annotations

import sys

import torch
from torch import nn

from nested_svit.detection.batchnorm import ragged_batch_norm
from nested_svit.distributed import init_from_env, shutdown


def rank_inputs(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + rank)
    shapes = [(1, 3, 4, 6), (2, 3, 2, 2)] if rank == 0 else [(1, 3, 8, 4)]
    return [torch.randn(s, generator=gen) * (rank + 1) + rank for s in shapes]


def make_bn() -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    return bn.train()


if __name__ == "__main__":
    info = init_from_env("cpu")
    xs = [x.requires_grad_() for x in rank_inputs(info.rank)]
    bn = make_bn()
    ys = ragged_batch_norm(bn, xs, sync=True)
    sum((y * (k + 1)).sum() for k, y in enumerate(ys)).backward()
    torch.save({"ys": [y.detach() for y in ys], "grads": [x.grad for x in xs], "mean": bn.running_mean,
                "var": bn.running_var}, f"{sys.argv[1]}.{info.rank}")
    shutdown(info)
