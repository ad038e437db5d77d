"""A simulated CUDA device for tests: CPU memory behind a device that follows CUDA's rules.

PyTorch's PrivateUse1 backend, renamed ``simcuda`` and registered as a Python backend (device guard and
hooks), holds ``SimTensor``s: wrapper subclasses over CPU tensors that report device ``simcuda:0``.
Factories on the device allocate them (``empty`` / ``empty_strided`` are the device's kernels); every op on
them reaches ``SimTensor.__torch_dispatch__`` (jagged nested tensors' internal ops included: a
``TorchDispatchMode`` would not see those while it runs), which applies CUDA's rules:

* an op mixing a device tensor with a CPU tensor of one or more dimensions is an error, as on CUDA
  (0-dim CPU tensors are allowed, and CPU indices for indexing);
* reads to the host (``.item()``, ``bool()``, ``.tolist()``, ``.cpu()``, ``nonzero``, boolean-mask
  indexing, ``unique``, ...) and blocking host-to-device copies are counted as syncs, with the line of
  the project's code that asked (``Recorder``);
* the attention kernels' input contracts are checked (``torch.nn.attention.varlen``'s flash / cuDNN
  choice, ``_flash_attention_forward``, ``_efficient_attention_forward``): dtypes, int32 offsets on the
  device, Python-int maximum lengths, last-dimension stride 1, head dimension, 16-byte alignment; the
  kernels are computed exactly in fp32 on the CPU;
* jagged SDPA chooses its kernel by CUDA's rules (flash for half precision, memory-efficient for fp32).

The project's CUDA branches run on it (``nested_svit.devices.CUDA_LIKE``): ``auto`` attention resolves to
varlen / nested, the deformable sampler and MLP take their non-CPU paths.
"""
from __future__ import annotations

import contextlib
import math
import traceback
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

NAME = "simcuda"
_READY = False
aten = torch.ops.aten


class ContractError(RuntimeError):
    """A kernel's input contract, broken (CUDA would fail or silently take a slow path)."""


@dataclass
class Recorder:
    """What ran on the device while recording: syncs (by kind and by project line), kernels chosen,
    contract violations."""

    syncs: Counter = field(default_factory=Counter)
    sync_sites: Counter = field(default_factory=Counter)
    kernels: Counter = field(default_factory=Counter)
    violations: list = field(default_factory=list)
    mixing: list = field(default_factory=list)
    host_copies: Counter = field(default_factory=Counter)  # host-to-device copies (blocking or not), by project line

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())


_recorders: list[Recorder] = []


def _site() -> str:
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "/nested_svit/" in frame.filename:
            return f"{frame.filename.split('/nested_svit/')[-1]}:{frame.lineno}"
    return "?"


def _sync(kind: str) -> None:
    if _recorders:
        site = _site()
        for r in _recorders:
            r.syncs[kind] += 1
            r.sync_sites[f"{kind} {site}"] += 1


def _host_copy() -> None:
    """A host-to-device copy of host data: legal, but a CUDA graph cannot capture one from pageable memory."""
    if _recorders:
        site = _site()
        for r in _recorders:
            r.host_copies[site] += 1


def _kernel(name: str) -> None:
    for r in _recorders:
        r.kernels[name] += 1


def _violation(message: str) -> None:
    for r in _recorders:
        r.violations.append(message)
    raise ContractError(message)


@contextlib.contextmanager
def recording():
    """``with recording() as rec:`` counts syncs and kernels of everything run on the device."""
    rec = Recorder()
    _recorders.append(rec)
    try:
        yield rec
    finally:
        _recorders.remove(rec)


def device() -> torch.device:
    setup()
    return torch.device(NAME, 0)


class SimTensor(torch.Tensor):
    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device=torch.device(NAME, 0),
                                                requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    def __repr__(self) -> str:  # noqa: D105
        return f"SimTensor(device={NAME}:0, {self.elem!r})"

    def tolist(self):
        _sync("tolist")
        return self.elem.tolist()

    def __reduce_ex__(self, protocol):  # torch.save: stored as its CPU tensor (read back as map_location="cpu")
        return self.elem.__reduce_ex__(protocol)

    def numpy(self, *args, **kwargs):
        raise TypeError(f"can't convert {NAME}:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                        "tensor to host memory first.")

    __array__ = numpy

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            _dense_sdpa(args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(t is not SimTensor and t is not torch.Tensor and not issubclass(t, torch.nn.Parameter) for t in types):
            return NotImplemented  # another subclass (a jagged nested tensor) dispatches first
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        _check_devices(func, args, kwargs)
        if func in _SYNC_OPS or (func in _MASK_INDEX_OPS and _bool_index(args)) \
                or (func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None):
            _sync(func.__name__)
        if func is aten.nonzero_static.default and "fill_value" not in kwargs and len(args) < 3:
            # without a fill value the caller claims to know the count on the host: it must be the mask's
            # (the capacity forward pads on purpose, with fill_value)
            actual = int(_unwrap(args[0]).count_nonzero())
            if actual != kwargs.get("size", args[1] if len(args) > 1 else None):
                _violation(f"nonzero_static: size {kwargs.get('size')} but the mask has {actual} entries ({_site()})")
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        return tree_map(_wrap, out)


def _unwrap(x):
    return x.elem if isinstance(x, SimTensor) else x


def _wrap(x):
    if isinstance(x, torch.Tensor) and not isinstance(x, SimTensor) and x.device.type == "cpu" and not x.is_nested:
        return SimTensor(x)
    return x


_SYNC_OPS = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
             aten.unique_consecutive.default, aten._local_scalar_dense.default, aten.bincount.default}
_MASK_INDEX_OPS = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
_INDEXING = _MASK_INDEX_OPS  # CUDA accepts CPU index tensors here


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _check_devices(func, args, kwargs) -> None:
    """CUDA refuses to mix a device tensor with a CPU tensor of >= 1 dimension (not CPU indices)."""
    flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
    cpu = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, SimTensor) and t.device.type == "cpu"
           and t.dim() > 0]
    if not cpu:
        return
    if func in _INDEXING:
        index_tensors = {id(i) for i in (args[1] or ()) if isinstance(i, torch.Tensor)}
        cpu = [t for t in cpu if id(t) not in index_tensors]
        if not cpu:
            return
    message = (f"Expected all tensors to be on the same device, but found at least two devices, {NAME}:0 and cpu! "
               f"({func}, at {_site()})")
    for r in _recorders:
        r.mixing.append(message)
    raise RuntimeError(message)


def _copy(func, args, kwargs):
    dst, src = args[0], args[1]
    non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
    if isinstance(dst, SimTensor) and not isinstance(src, SimTensor) and src.dim() > 0:
        _host_copy()
        if not non_blocking:
            _sync("h2d_blocking")
    if not isinstance(dst, SimTensor) and isinstance(src, SimTensor):
        _sync("d2h_copy")
    _unwrap(dst).copy_(_unwrap(src))
    return dst


def _to_copy(func, args, kwargs):
    target = kwargs.get("device")
    kw = {k: v for k, v in kwargs.items() if k != "device"}
    if target is not None and torch.device(target).type == "cpu":
        _sync("d2h_copy")
        return func(_unwrap(args[0]), **kw)
    if isinstance(args[0], SimTensor):  # on the device already: a dtype / layout change
        return SimTensor(func(args[0].elem, **kw))
    if target is not None and args[0].dim() > 0:
        _host_copy()
    return tree_map(_wrap, func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs)))


# ---------------------------------------------------------------- attention kernels
def _check_rows(name: str, tensors: dict, dtypes: tuple, head_multiple: int, max_head: int) -> None:
    ref = next(iter(tensors.values()))
    for key, t in tensors.items():
        if not isinstance(t, SimTensor):
            _violation(f"{name}: {key} is not on the device")
        if t.dtype not in dtypes:
            _violation(f"{name}: {key} is {t.dtype}; the kernel takes {dtypes}")
        if t.dtype != ref.dtype:
            _violation(f"{name}: {key} is {t.dtype}, query {ref.dtype}")
        if t.stride(-1) != 1:
            _violation(f"{name}: {key} has last-dimension stride {t.stride(-1)} (must be 1)")
        if t.shape[-1] % head_multiple or t.shape[-1] > max_head:
            _violation(f"{name}: head dim {t.shape[-1]} must be a multiple of {head_multiple} and <= {max_head}")
        if (t.elem.storage_offset() * t.element_size()) % 16 or t.elem.untyped_storage().data_ptr() % 16:
            _violation(f"{name}: {key} is not 16-byte aligned")
        for s in t.stride()[:-1]:
            if (s * t.element_size()) % 16:
                _violation(f"{name}: {key} stride {t.stride()} is not 16-byte aligned")


def _check_offsets(name: str, cu, max_len, rows: int) -> None:
    if not isinstance(cu, SimTensor):
        _violation(f"{name}: cumulative sequence lengths must be on the device, got {type(cu).__name__}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or not cu.elem.is_contiguous():
        _violation(f"{name}: cumulative sequence lengths must be a contiguous 1-D int32 tensor, got {cu.dtype}")
    if isinstance(max_len, torch.Tensor) or not isinstance(max_len, int):
        _violation(f"{name}: the maximum length must be a Python int, got {type(max_len).__name__}")
    values = cu.elem.tolist()
    if values[0] != 0 or values[-1] != rows or any(b < a for a, b in zip(values, values[1:])):
        _violation(f"{name}: offsets {values[:4]}... do not cover the {rows} rows")
    if max(b - a for a, b in zip(values, values[1:])) > max_len:
        _violation(f"{name}: a sequence is longer than max length {max_len}")


def _attend(q, k, v, cu_q, cu_k, scale):
    """Exact attention of each sequence in fp32 -> (out [Tq, H, D] in q's dtype, logsumexp [H, Tq])."""
    q, k, v = (_unwrap(t).float() for t in (q, k, v))
    qo, ko = _unwrap(cu_q).tolist(), _unwrap(cu_k).tolist()
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1])
    lse = torch.zeros(q.shape[1], q.shape[0])
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    for (a, b), (c, d) in zip(zip(qo, qo[1:]), zip(ko, ko[1:])):
        if b > a and d > c:
            logits = torch.einsum("qhd,khd->hqk", q[a:b], k[c:d]) * scale
            lse[:, a:b] = torch.logsumexp(logits, -1)
            out[a:b] = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v[c:d])
    return out, lse


def _flash(func, args, kwargs):
    q, k, v, cu_q, cu_k, max_q, max_k = args[:7]
    _check_rows("flash", {"query": q, "key": k, "value": v}, (torch.float16, torch.bfloat16), 8, 256)
    _check_offsets("flash", cu_q, max_q, q.shape[0])
    _check_offsets("flash", cu_k, max_k, k.shape[0])
    _kernel("flash")
    out, lse = _attend(q, k, v, cu_q, cu_k, kwargs.get("scale"))
    return (SimTensor(out.to(q.dtype)), SimTensor(lse), SimTensor(torch.zeros(2, dtype=torch.int64)),
            SimTensor(torch.zeros(0)), SimTensor(torch.zeros(0)))


def _varlen(func, args, kwargs):
    q, k, v, cu_q, cu_k, max_q, max_k = args[:7]
    # varlen_attn's own rule on an H200 (sm90, cuDNN >= 9.18): cuDNN when the longest query exceeds 128
    kernel = "cudnn" if max_q > 128 and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 else "flash"
    _check_rows(f"varlen/{kernel}", {"query": q, "key": k, "value": v}, (torch.float16, torch.bfloat16), 8, 256)
    _check_offsets(f"varlen/{kernel}", cu_q, max_q, q.shape[0])
    _check_offsets(f"varlen/{kernel}", cu_k, max_k, k.shape[0])
    _kernel(f"varlen/{kernel}")
    out, lse = _attend(q, k, v, cu_q, cu_k, args[8] if len(args) > 8 else kwargs.get("scale"))
    return SimTensor(out.to(q.dtype)), SimTensor(lse), SimTensor(torch.zeros(2, dtype=torch.int64))


def _efficient(func, args, kwargs):
    q, k, v, bias, cu_q, cu_k, max_q, max_k = args[:8]
    head = 8 if q.dtype in (torch.float16, torch.bfloat16) else 4
    _check_rows("efficient", {"query": q, "key": k, "value": v}, (torch.float16, torch.bfloat16, torch.float32),
                head, 1024)
    if bias is not None:
        _violation("efficient: no bias on the jagged path")
    _check_offsets("efficient", cu_q, max_q, q.shape[1])
    _check_offsets("efficient", cu_k, max_k, k.shape[1])
    _kernel("efficient")
    out, lse = _attend(q[0], k[0], v[0], cu_q, cu_k, kwargs.get("scale"))
    return (SimTensor(out.to(q.dtype)[None]), SimTensor(lse[None]), SimTensor(torch.zeros((), dtype=torch.int64)),
            SimTensor(torch.zeros((), dtype=torch.int64)), max_q, max_k)


def _dense_sdpa(args, kwargs) -> None:
    """Dense SDPA on the device: CUDA's fused kernels take 4-D ``[B, H, N, D]`` inputs (a 3-D call falls
    back to the math kernel); flash wants half precision and no mask, memory-efficient takes fp32."""
    q = args[0]
    mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
    if q.dim() != 4:
        _violation(f"sdpa: a {q.dim()}-D call ({tuple(q.shape)}) takes CUDA's math kernel; give [B, H, N, D]")
    flash = q.dtype in (torch.float16, torch.bfloat16) and mask is None and q.shape[-1] <= 256
    _kernel("sdpa/flash" if flash else "sdpa/efficient")


_HANDLERS = {aten.copy_.default: _copy, aten._to_copy.default: _to_copy,
             aten._flash_attention_forward.default: _flash, aten._efficient_attention_forward.default: _efficient}


def _jagged_backend(query, key, value, attn_mask, dropout, is_causal, enable_gqa):
    """Jagged SDPA's kernel choice on CUDA: flash for fp16/bf16 (head dim <= 256), memory-efficient for
    fp32; the math kernel otherwise."""
    from torch.nn.attention import SDPBackend

    from torch.nested._internal import sdpa as jagged

    if query.device.type != NAME:
        return _ORIGINAL_SELECT(query, key, value, attn_mask, dropout, is_causal, enable_gqa)
    if attn_mask is None and dropout == 0.0 and query.dtype in (torch.float16, torch.bfloat16) \
            and query.size(-1) <= 256:
        return SDPBackend.FLASH_ATTENTION
    if attn_mask is None and query.size(-1) % (8 if query.dtype != torch.float32 else 4) == 0:
        return SDPBackend.EFFICIENT_ATTENTION
    del jagged
    return SDPBackend.MATH


_ORIGINAL_SELECT = None


_REGISTERED = False


def register() -> None:
    """Name the backend and register its device guard, once per process, before the first backward
    anywhere in it (autograd sizes its per-device queues when its threads start; tests/conftest.py
    calls this at start-up). Changes nothing for other devices."""
    global _REGISTERED
    if not _REGISTERED:
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        _setup_privateuseone_for_python_backend(rename=NAME)
        _REGISTERED = True


def setup() -> None:
    """Register the device and its kernels once per process (the backend cannot be renamed twice)."""
    global _READY, _ORIGINAL_SELECT
    if _READY:
        return
    import torch.nn.attention.varlen  # noqa: F401 (registers torch_attn::_varlen_attn)
    from torch.nested._internal import sdpa as jagged

    from nested_svit import devices

    register()
    lib = torch.library.Library("aten", "IMPL")  # kept alive below: the registrations live as long as it
    lib.impl("empty.memory_format", lambda size, dtype=None, layout=None, device=None, pin_memory=None,
             memory_format=None: SimTensor(torch.empty(size, dtype=dtype, memory_format=memory_format)), "PrivateUse1")
    lib.impl("empty_strided", lambda size, stride, dtype=None, layout=None, device=None, pin_memory=None:
             SimTensor(torch.empty_strided(size, stride, dtype=dtype)), "PrivateUse1")
    # factories that would otherwise run as ``out=`` kernels resizing an empty device tensor (a wrapper cannot
    # be resized): computed on the CPU and wrapped
    for name, fn in (("arange", lambda end, dtype=None, layout=None, device=None, pin_memory=None:
                      torch.arange(end, dtype=dtype)),
                     ("arange.start", lambda start, end, dtype=None, layout=None, device=None, pin_memory=None:
                      torch.arange(start, end, dtype=dtype)),
                     ("arange.start_step", lambda start, end, step=1, dtype=None, layout=None, device=None,
                      pin_memory=None: torch.arange(start, end, step, dtype=dtype)),
                     ("linspace", lambda start, end, steps, dtype=None, layout=None, device=None, pin_memory=None:
                      torch.linspace(start, end, steps, dtype=dtype)),
                     ("scalar_tensor", lambda s, dtype=None, layout=None, device=None, pin_memory=None:
                      torch.scalar_tensor(s, dtype=dtype)),
                     ("randperm", lambda n, dtype=torch.int64, layout=None, device=None, pin_memory=None:
                      torch.randperm(n, dtype=dtype))):
        lib.impl(name, (lambda f: lambda *a, **k: SimTensor(f(*a, **k)))(fn), "PrivateUse1")
    def _copy_from(src, dst, non_blocking=False):  # torch.tensor(data, device=...) copies in C++
        if src.dim() > 0:
            _host_copy()
        if not non_blocking and src.dim() > 0:
            _sync("h2d_blocking")
        _unwrap(dst).copy_(_unwrap(src))
        return dst

    lib.impl("_copy_from", _copy_from, "PrivateUse1")
    globals()["_LIB"] = lib
    _HANDLERS[torch.ops.torch_attn._varlen_attn.default] = _varlen
    import torchvision  # noqa: F401 (registers torchvision::nms: its CUDA kernel reads the kept count)

    _SYNC_OPS.add(torch.ops.torchvision.nms.default)
    _ORIGINAL_SELECT = jagged._select_sdp_backend
    jagged._select_sdp_backend = _jagged_backend
    devices.CUDA_LIKE.add(NAME)
    # module.to(dtype) on device parameters: swap the wrappers (``param.data = ...`` would keep the old elem)
    torch.__future__.set_swap_module_params_on_conversion(True)
    _READY = True


def to_device(x):
    """A tensor, module or nested structure of tensors onto the simulated device."""
    dev = device()
    if isinstance(x, torch.nn.Module):
        return x.to(dev)
    return tree_map(lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, x)


def to_cpu(x):
    """Plain CPU tensors back (not counted as syncs: a test reading results)."""
    return tree_map(lambda t: t.elem.clone() if isinstance(t, SimTensor) else t, x)


__all__ = ["setup", "device", "recording", "Recorder", "ContractError", "SimTensor", "to_device", "to_cpu"]
del math
