"""Which devices follow CUDA's rules, and the few CUDA calls the library makes, in one place.

``is_cuda(device)`` decides every CUDA-only branch (the varlen / jagged attention backends, ``auto``'s
choice, autocast, pinned copies): real CUDA devices, and the device types in ``CUDA_LIKE`` (the test
suite's simulated CUDA device adds its own, so those branches run on a CPU in tests). Calls that need a
real GPU (``synchronize``, events, memory statistics, ``set_device``) happen only for ``cuda`` itself.
"""
from __future__ import annotations

import contextlib
import os
import time

import torch

CUDA_LIKE: set[str] = {"cuda"}
# precision -> the dtype a model's input and stream are in; int8 runs a classifier's block linears in int8
# (``precision.set_precision``) and everything else, its input included, in fp32
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}


def dtype_of(precision: str) -> torch.dtype:
    """``fp32`` / ``bf16`` / ``fp16`` -> the torch dtype; anything else is a one-line error."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 in hardware: a CPU with AVX512-BF16 or AMX (oneDNN otherwise emulates
    bf16, slower than fp32), or a CUDA device (Ampere and later)."""
    device = torch.device(device)
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                    or getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    return is_real_cuda(device) and torch.cuda.is_bf16_supported()


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; any other name as given, checked: a name
    torch does not know, or a CUDA device torch does not see, is one line (not the driver's message)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r}: not a device name (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: torch sees no CUDA device here (no GPU, or no driver); use --device "
                             "cpu, or auto (a GPU when there is one)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: torch sees {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
    return name


def is_cuda(device: torch.device | str) -> bool:
    """Whether ``device`` runs CUDA's kernels and rules (a real or a simulated CUDA device)."""
    return torch.device(device).type in CUDA_LIKE


def is_real_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (real CUDA only; elsewhere work is synchronous)."""
    if is_real_cuda(device):
        torch.cuda.synchronize(device)


def seconds_of(fn, device: torch.device | str) -> float:
    """Wall time of ``fn()``: CUDA events around it on a real CUDA device (its queued work included),
    else the host clock."""
    if is_real_cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cuda_peak_mb(fn, device: torch.device | str) -> float:
    """Peak MiB the CUDA allocator held for ``fn()`` beyond what was allocated before (real CUDA only)."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def cuda_available() -> bool:
    return torch.cuda.is_available()


def cuda_rng_states() -> list[torch.Tensor] | None:
    """Every CUDA device's RNG state (None without CUDA), for training checkpoints."""
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def set_cuda_rng_states(states: list[torch.Tensor]) -> None:
    """Restore ``cuda_rng_states()`` (read on the CPU); nothing without CUDA."""
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states])


def set_cuda_device(device: torch.device | str) -> None:
    """Make ``device`` this process's current CUDA device (before NCCL starts)."""
    torch.cuda.set_device(torch.device(device))


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


VARLEN_KERNELS = ("auto", "flash")
_varlen_kernel = os.environ.get("NESTED_SVIT_VARLEN_KERNEL", "auto")


def set_varlen_kernel(name: str) -> None:
    """``auto``: ``torch.nn.attention.varlen.varlen_attn``'s choice (cuDNN on Hopper/Blackwell when the
    longest sequence exceeds 128 rows, flash otherwise); ``flash``: always flash (A/B tests, and a way
    out of a cuDNN problem). Also ``NESTED_SVIT_VARLEN_KERNEL``."""
    global _varlen_kernel
    if name not in VARLEN_KERNELS:
        raise ValueError(f"varlen kernel {name!r}; choose from {VARLEN_KERNELS}")
    _varlen_kernel = name


def varlen_kernel() -> str:
    """The varlen attention kernel ``attention.py`` uses on CUDA (``set_varlen_kernel``)."""
    return _varlen_kernel


def kernel_settings() -> dict:
    """The math settings GPU numbers depend on (TF32, cuDNN, the varlen kernel), recorded in every eval,
    predict and bench output."""
    out = {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
           "cudnn_benchmark": torch.backends.cudnn.benchmark, "float32_matmul_precision":
           torch.get_float32_matmul_precision(), "varlen_kernel": varlen_kernel()}
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


def capture_graph(fn, example: torch.Tensor, warmup: int = 2, pool=None):
    """``fn(x)`` (no host read, no host copy, static shapes: ``SparseViT.forward_device``) captured as
    a CUDA graph for inputs shaped as ``example`` (real CUDA only) -> ``replay(x)``: copies ``x`` into
    the graph's input and replays it, returning the graph's outputs (overwritten by the next replay).
    ``warmup`` eager calls on a side stream come first (allocations, compilation); ``pool``: a memory
    pool shared by several graphs (``torch.cuda.graph_pool_handle()``)."""
    if not is_real_cuda(example.device):
        raise ValueError(f"CUDA graphs need a CUDA device, not {example.device}")
    static = example.clone()
    stream = torch.cuda.Stream(example.device)
    stream.wait_stream(torch.cuda.current_stream(example.device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn(static)
    torch.cuda.current_stream(example.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn(static)

    def replay(x: torch.Tensor):
        static.copy_(x)
        graph.replay()
        return outputs

    return replay


def graph_pool(device: torch.device | str):
    """A memory pool for the CUDA graphs of one model (real CUDA), else None."""
    return torch.cuda.graph_pool_handle() if is_real_cuda(device) else None
