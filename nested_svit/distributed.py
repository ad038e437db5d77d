"""torchrun process helpers (as detectron2's ``utils/comm.py``), for evaluation and training alike:
joining the process group the environment describes (gloo on CPU, nccl on CUDA), this process's
rank and device, barriers and small all-reduces."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .devices import resolve_device, set_cuda_device, set_kernel_settings


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str) -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            set_cuda_device(rank_device(device, info))
        dist.init_process_group(backend=backend)
    return info


def rank_device(device: str, info: DistInfo) -> str:
    """This process's device: under torchrun ``cuda`` is ``cuda:<local rank>`` and ``cuda:N`` is
    ``cuda:<N + local rank>`` (the first GPU of this node's share); other devices as given."""
    if info.world_size <= 1 or not device.startswith("cuda"):
        return device
    first = int(device.split(":", 1)[1]) if ":" in device else 0
    return f"cuda:{first + info.local_rank}"


def process_setup(device: str = "auto", threads: int | None = None) -> tuple[torch.device, DistInfo]:
    """The one set-up of a training or inference process -> (its device, ``DistInfo``): ``device`` resolved
    (``auto``: CUDA when torch sees a GPU), the torchrun group joined when there is one, the math settings
    (TF32 off) that outputs record, ``threads`` torch CPU threads (None: torch's default)."""
    set_kernel_settings(False)
    resolved = resolve_device(device)
    info = init_from_env(resolved)
    if threads:
        torch.set_num_threads(threads)
    return torch.device(rank_device(resolved, info)), info


def current() -> DistInfo:
    """The process group this process has joined (``init_from_env``), else a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_ranks(flag: bool, info: DistInfo, device: torch.device | str = "cpu") -> bool:
    """True when ``flag`` holds on every rank (every rank must call this; ``device``: where the
    process group's backend reduces, CUDA for NCCL)."""
    if info.world_size <= 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def sum_over_ranks(values: list[float], info: DistInfo, device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum of ``values`` over the ranks (every rank must call this)."""
    if info.world_size <= 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_state(module: nn.Module, info: DistInfo, parameters: bool = True) -> None:
    """Copy rank 0's buffers (and parameters) to every rank."""
    if info.world_size <= 1:
        return
    tensors = list(module.buffers()) + (list(module.parameters()) if parameters else [])
    for t in tensors:
        dist.broadcast(t.data, 0)
