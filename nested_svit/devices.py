"""Which devices follow CUDA's rules, and the few CUDA calls the library makes, in one place.

``is_cuda(device)`` decides every CUDA-only branch (the varlen / jagged attention backends, ``auto``'s
choice, autocast, pinned copies): real CUDA devices, and the device types in ``CUDA_LIKE`` (the test
suite's simulated CUDA device adds its own, so those branches run on a CPU in tests). Calls that need a
real GPU (``synchronize``, events, memory statistics, ``set_device``) happen only for ``cuda`` itself.
"""
from __future__ import annotations

import contextlib

import torch

CUDA_LIKE: set[str] = {"cuda"}


def is_cuda(device: torch.device | str) -> bool:
    """Whether ``device`` runs CUDA's kernels and rules (a real or a simulated CUDA device)."""
    return torch.device(device).type in CUDA_LIKE


def is_real_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (real CUDA only; elsewhere work is synchronous)."""
    if is_real_cuda(device):
        torch.cuda.synchronize(device)


def autocast(enabled: bool, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on a real CUDA device when ``enabled``, else nothing."""
    if enabled and is_real_cuda(device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pin(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` in page-locked memory when it is bound for a real CUDA device (so ``non_blocking``
    copies are asynchronous), else as it is."""
    return tensor.pin_memory() if is_real_cuda(device) else tensor


_CONSTANTS: dict = {}


def constant(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A small constant tensor (box stds, a normaliser, a scale factor) on ``device``, copied from the
    host once per distinct value and kept: no host-to-device copy in the steady state. Read-only."""
    def frozen(v):
        return tuple(frozen(x) for x in v) if isinstance(v, (list, tuple)) else v

    key = (frozen(values), dtype, str(torch.device(device)))
    out = _CONSTANTS.get(key)
    if out is None:
        if len(_CONSTANTS) > 4096:
            _CONSTANTS.clear()
        # pageable host memory: staged at once, no wait for the device
        out = _CONSTANTS[key] = torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
    return out


def kernel_settings() -> dict:
    """The math settings GPU numbers depend on, recorded in eval and bench outputs."""
    out = {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
           "cudnn_benchmark": torch.backends.cudnn.benchmark, "float32_matmul_precision":
           torch.get_float32_matmul_precision()}
    if torch.cuda.is_available():
        out["cudnn_version"] = torch.backends.cudnn.version()
    return out


def set_kernel_settings(tf32: bool = False) -> None:
    """What eval and bench run with: TF32 off by default (fp32 means fp32; ``tf32=True`` for speed)."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def side_stream(device: torch.device | str):
    """A CUDA stream for copies that overlap the compute (real CUDA), else None (work is in order)."""
    return torch.cuda.Stream(torch.device(device)) if is_real_cuda(device) else None


def on_stream(stream) -> contextlib.AbstractContextManager:
    """Work issued inside runs on ``stream`` (``side_stream``'s; None: where it would run anyway)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def hand_over(stream, tensors: list[torch.Tensor]) -> None:
    """Make the current stream wait for ``stream``'s work, and keep ``tensors`` (made on ``stream``)
    alive for the current stream's use (the caching allocator would reuse them early otherwise)."""
    if stream is None:
        return
    current = torch.cuda.current_stream(stream.device)
    current.wait_stream(stream)
    for t in tensors:
        t.record_stream(current)
