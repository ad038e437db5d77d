"""Attention over ragged token sets. The only module that knows attention backends.

Every context below takes the fused ``qkv`` projection and returns the attended values in the
same row layout, so ``layers.Attention`` never branches on how rows are grouped:

* ``DenseContext``      -- ``qkv [B, N, 3C]``: one SDPA call (dense DeiT, uniform packed sets).
* ``VarlenContext``     -- ``qkv [T, 3C]`` packed: each image attends only to its own rows, through
  one of the variable-length backends (``BACKENDS``).
* ``KeyMaskedContext``  -- ``qkv [B, N, 3C]`` with a ``[B, N]`` keep mask: pruned keys get zero
  attention weight (training, Eq. 1); gradients flow into the mask.
Every backend is batch-invariant: an image's values never depend on the other images of its batch.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .devices import VARLEN_KERNELS, is_cuda, set_varlen_kernel, varlen_kernel  # noqa: F401 (re-exported)
from .tokens import CapacityRows, Layout, from_nested, pad, padding_mask, to_nested, unpad

BACKENDS = ("loop", "padded", "nested", "varlen")


def _split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``[..., 3C]`` -> q, k, v each ``[..., H, D]`` (views)."""
    *lead, c3 = qkv.shape
    q, k, v = qkv.view(*lead, 3, num_heads, c3 // (3 * num_heads)).unbind(-3)
    return q, k, v


def dense_attention(qkv: Tensor, num_heads: int, key_bias: Tensor | None = None) -> Tensor:
    """``qkv [B, N, 3C]`` -> ``[B, N, C]``; all tokens of an image attend to each other.
    ``key_bias [B, N]``: added to every logit of that key."""
    b, n, c3 = qkv.shape
    q, k, v = qkv.view(b, n, 3, num_heads, c3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    mask = None if key_bias is None else key_bias.to(q.dtype)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, N, D]
    return out.transpose(1, 2).reshape(b, n, c3 // 3)


# ---------------------------------------------------------------- variable-length backends
def _loop_backend(q: Tensor, k: Tensor, v: Tensor, layout: Layout, key_bias: Tensor | None = None) -> Tensor:
    """Per-image SDPA on slices of the packed tensors: 4-D ``[1, H, n, D]`` calls (CUDA's fused kernels)."""
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, T, D] strided views
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, H, D] contiguous: reshapes to [T, C] free
    for s, n in zip(layout.starts, layout.lengths):
        mask = None if key_bias is None else key_bias[s:s + n].to(q.dtype)[None, None, None, :]
        out[s:s + n] = F.scaled_dot_product_attention(qh[:, :, s:s + n], kh[:, :, s:s + n], vh[:, :, s:s + n],
                                                      attn_mask=mask)[0].transpose(0, 1)
    return out


def _padded_backend(q: Tensor, k: Tensor, v: Tensor, layout: Layout, key_bias: Tensor | None = None,
                    pad_to: tuple[int, ...] | None = None) -> Tensor:
    """Pad to ``[B, H, P, D]``, padded keys masked. ``pad_to``: each image's padded length, fixed by the
    image itself (its token count before selection), never by its batch mates (the kernel's blocking
    follows ``P``); one call per length. None: the batch's longest sequence."""
    groups: dict[int, list[int]] = {}
    for b, p in enumerate(pad_to if pad_to is not None else (layout.max_len,) * layout.batch_size):
        groups.setdefault(int(p), []).append(b)
    if len(groups) == 1:
        return _padded_group(q, k, v, layout, next(iter(groups)), key_bias)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for length, images in groups.items():  # mixed resolutions
        rows = torch.cat([torch.arange(layout.starts[b], layout.starts[b] + n) for b, n in
                          ((b, layout.lengths[b]) for b in images)]).to(q.device)
        part = Layout.from_lengths([layout.lengths[b] for b in images], q.device)
        sub = (t.index_select(0, rows) for t in (q, k, v))
        out[rows] = _padded_group(*sub, part, length, None if key_bias is None else key_bias.index_select(0, rows))
    return out


def _padded_group(q: Tensor, k: Tensor, v: Tensor, layout: Layout, length: int, key_bias: Tensor | None) -> Tensor:
    """``[T, H, D]`` rows of ``layout``, every image padded to ``length`` rows -> ``[T, H, D]``."""
    qp, kp, vp = (pad(t, layout, length=length).transpose(1, 2) for t in (q, k, v))
    key_mask = padding_mask(layout, length)[:, None, None, :]
    if key_bias is not None:
        key_mask = pad(key_bias.to(q.dtype)[:, None], layout, float("-inf"), length)[..., 0][:, None, None, :]
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=key_mask)  # padded query rows are dropped
    return unpad(out.transpose(1, 2), layout)


def _nested_backend(q: Tensor, k: Tensor, v: Tensor, layout: Layout) -> Tensor:
    """Jagged nested tensors + SDPA. On CUDA the fused kernels read the strided ``[T, H, D]`` views of
    the fused qkv as they are (no copy). Copies are made only where needed: NJT SDPA's CPU (math)
    kernel wants each of q, k, v contiguous, and jagged construction raises for inference tensors
    ("Cannot set version_counter for inference tensor"; run under ``torch.no_grad`` to avoid it)."""
    mode_guard: contextlib.AbstractContextManager = contextlib.nullcontext()
    copy = q.is_inference() or not is_cuda(q.device)
    if q.is_inference():
        mode_guard = torch.inference_mode(False)
    # On CPU, NJT SDPA only has the math kernel; pinning it skips the fused-kernel probes, which in
    # CUDA builds of torch query the CUDA driver and fail on machines without one.
    kernel_guard: contextlib.AbstractContextManager = contextlib.nullcontext()
    if q.device.type == "cpu":
        kernel_guard = sdpa_kernel(SDPBackend.MATH)
    with mode_guard, kernel_guard:
        if copy:
            q, k, v = (t.clone(memory_format=torch.contiguous_format) for t in (q, k, v))
        nts = [to_nested(t, layout).transpose(1, 2) for t in (q, k, v)]  # [B, H, j, D]
        return from_nested(F.scaled_dot_product_attention(*nts).transpose(1, 2))


def _varlen_kernel(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int) -> Tensor:
    """The CUDA varlen kernel on ``[T, H, D]`` rows: int32 offsets on the device, host max lengths."""
    if varlen_kernel() == "flash":
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False)[0]
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k)


def _varlen(q: Tensor, k: Tensor, v: Tensor, q_layout: Layout, k_layout: Layout) -> Tensor:
    return _varlen_kernel(q, k, v, q_layout.offsets.to(torch.int32), k_layout.offsets.to(torch.int32),
                          q_layout.max_len, k_layout.max_len)


def _varlen_backend(q: Tensor, k: Tensor, v: Tensor, layout: Layout) -> Tensor:
    """CUDA varlen attention (flash or cuDNN; fp16/bf16)."""
    return _varlen(q, k, v, layout, layout)


_IMPLS: dict[str, Callable[[Tensor, Tensor, Tensor, Layout], Tensor]] = {
    "loop": _loop_backend, "padded": _padded_backend, "nested": _nested_backend, "varlen": _varlen_backend,
}


def backend_available(name: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> bool:
    """Whether ``name`` runs on this device/dtype in this torch build."""
    device = torch.device(device)
    if name in ("loop", "padded", "nested"):
        return True
    if name == "varlen":
        if not is_cuda(device) or dtype not in (torch.float16, torch.bfloat16):
            return False
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        except ImportError:
            return False
        return True
    raise ValueError(f"unknown attention backend {name!r}; choose from {('auto',) + BACKENDS}")


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """``auto`` -> one backend for the whole run, never per call (a choice that follows the batch's shapes
    makes an image's values depend on its batch mates): CUDA half precision: flash varlen; other CUDA:
    jagged nested SDPA; CPU: ``loop`` (per-image SDPA, the image's arithmetic alone; NJT SDPA is a slow
    per-image math path on CPU)."""
    if name != "auto":
        if not backend_available(name, device, dtype):
            raise ValueError(f"attention backend {name!r} is not available on {device} with {dtype}")
        return name
    if is_cuda(device):
        return "varlen" if backend_available("varlen", device, dtype) else "nested"
    return "loop"


_COUNTING = contextvars.ContextVar("nested_svit_counting_flops", default=False)


@contextlib.contextmanager
def countable():
    """Jagged and varlen attention as per-image SDPA, which ``torch.utils.flop_counter`` can count."""
    token = _COUNTING.set(True)
    try:
        yield
    finally:
        _COUNTING.reset(token)


KEY_BIAS_BACKENDS = ("loop", "padded")  # the others get a key bias through KeyBiasContext's widening


def varlen_attention(qkv: Tensor, num_heads: int, layout: Layout, backend: str = "loop",
                     key_bias: Tensor | None = None, pad_to: tuple[int, ...] | None = None) -> Tensor:
    """Packed ``qkv [T, 3C]`` -> ``[T, C]``; image ``b`` attends within its own rows only.
    ``key_bias [T]`` (uniform layouts or ``KEY_BIAS_BACKENDS``): added to every logit of that key.
    ``pad_to``: each image's padded length for ``padded`` (see ``_padded_backend``)."""
    t, c3 = qkv.shape
    if 0 in layout.lengths:  # images with no active token own no rows: drop them from the layout
        if pad_to is not None:
            pad_to = tuple(p for p, n in zip(pad_to, layout.lengths) if n > 0)
        layout = Layout.from_lengths([n for n in layout.lengths if n > 0], qkv.device)
    if t == 0:
        return qkv.new_zeros(0, c3 // 3)
    # one SDPA call for equal lengths is the per-image arithmetic, except where ``padded`` pads further
    if layout.is_uniform and (backend != "padded" or pad_to is None or set(pad_to) == {layout.max_len}):
        bias = None if key_bias is None else key_bias.view(layout.batch_size, -1)
        return dense_attention(qkv.view(layout.batch_size, -1, c3), num_heads, bias).view(t, c3 // 3)
    q, k, v = _split_heads(qkv, num_heads)
    if _COUNTING.get() and backend in ("nested", "varlen"):
        backend = "loop"
    if backend == "padded":
        return _padded_backend(q, k, v, layout, key_bias, pad_to).reshape(t, c3 // 3)
    if key_bias is not None:
        if backend not in KEY_BIAS_BACKENDS:
            raise ValueError(f"the {backend} backend takes no key bias (use KeyBiasContext)")
        return _IMPLS[backend](q, k, v, layout, key_bias).reshape(t, c3 // 3)
    return _IMPLS[backend](q, k, v, layout).reshape(t, c3 // 3)


def query_subset_attention(qkv: Tensor, num_heads: int, layout: Layout, query_keep: "Tensor | tuple[Tensor, Layout]",
                           backend: str = "loop", pad_to: tuple[int, ...] | None = None) -> Tensor:
    """Packed ``qkv [T, 3C]`` of ``layout`` and the kept query rows (``[T]`` bool, or their indices and
    layout from ``tokens.kept_rows``, computed without a sync by a caller that knows the counts) -> ``[T_q,
    C]``: the kept rows' attention against every row of its image (ATS: other rows' outputs are never
    computed). ``pad_to``: as in ``varlen_attention``."""
    from .tokens import kept_rows

    t, c3 = qkv.shape
    q, k, v = _split_heads(qkv, num_heads)
    q_index, q_layout = query_keep if isinstance(query_keep, tuple) else kept_rows(query_keep, layout)
    qs = q.index_select(0, q_index)
    if _COUNTING.get() and backend == "varlen":
        backend = "loop"
    if backend == "padded" and (pad_to is None or len(set(pad_to)) == 1):
        length = None if pad_to is None else pad_to[0]
        qp = pad(qs, q_layout, length=length).transpose(1, 2)
        kp, vp = (pad(t, layout, length=length).transpose(1, 2) for t in (k, v))
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=padding_mask(layout, length)[:, None, None, :])
        return unpad(out.transpose(1, 2), q_layout).reshape(-1, c3 // 3)
    if backend == "varlen":
        return _varlen(qs, k, v, q_layout, layout).reshape(-1, c3 // 3)
    out = qs.new_empty(qs.shape)  # loop (and nested, whose jagged SDPA would need two layouts): per image
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (qs, k, v))  # 4-D [1, H, T, D], as CUDA's kernels take
    for b, (sq, nq, s, n) in enumerate(zip(q_layout.starts, q_layout.lengths, layout.starts, layout.lengths)):
        qb, kb, vb, mask = qh[:, :, sq:sq + nq], kh[:, :, s:s + n], vh[:, :, s:s + n], None
        if nq and backend == "padded":  # mixed padded lengths: each image padded to its own length, as alone
            p = pad_to[b]  # type: ignore[index]
            qb, kb, vb = F.pad(qb, (0, 0, 0, p - nq)), F.pad(kb, (0, 0, 0, p - n)), F.pad(vb, (0, 0, 0, p - n))
            mask = (torch.arange(p, device=q.device) < n)[None, None, None, :]
        if nq:
            out[sq:sq + nq] = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)[0, :, :nq].transpose(0, 1)
    return out.reshape(-1, c3 // 3)

CAPACITY_BACKENDS = ("padded", "varlen")  # offsets on the device, no host lengths


def capacity_backend(name: str) -> str:
    """The attention a capacity forward runs for the resolved backend ``name``: the CUDA varlen kernel
    (its offsets on the device, a static maximum length), else the masked padded grid. The loop and
    jagged backends need every image's length on the host."""
    return "varlen" if name == "varlen" else "padded"


def capacity_attention(qkv: Tensor, num_heads: int, rows: CapacityRows, backend: str = "padded") -> Tensor:
    """``qkv [R, 3C]`` of capacity ``rows`` -> ``[R, C]``: each kept row attends to its image's kept
    rows; padding rows get values nobody reads. Static shapes, no host read. ``varlen``: the kernel
    over ``rows.cu_seqlens`` (padding rows are sequences of their own); ``padded``: the rows placed
    in a ``[B, max_len]`` grid by ``rows.slots``, keys not kept masked (one SDPA call)."""
    r, c3 = qkv.shape
    c, b, m = c3 // 3, rows.batch_size, rows.max_len
    q, k, v = _split_heads(qkv, num_heads)
    if backend == "varlen" and not _COUNTING.get():
        return _varlen_kernel(q, k, v, rows.cu_seqlens, rows.cu_seqlens, m, m).reshape(r, c)
    grid = qkv.new_zeros(b * m + 1, c3)
    grid[rows.slots] = qkv  # padding rows all land on the spare last place
    key_keep = torch.zeros(b * m + 1, dtype=torch.bool, device=qkv.device)
    key_keep[rows.slots] = rows.valid
    d = c // num_heads
    qg, kg, vg = grid[:-1].view(b, m, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, M, D]
    mask = key_keep[:-1].view(b, 1, 1, m)
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask).transpose(1, 2).reshape(b * m, c)
    return out[rows.slots.clamp(max=b * m - 1)]


def masked_attention(qkv: Tensor, num_heads: int, key_keep: Tensor) -> Tensor:
    """``qkv [B, N, 3C]``, ``key_keep [B, N]`` float in [0, 1] -> ``[B, N, C]``. Weights ``exp(s - max) *
    key_keep`` renormalised: an exact softmax over kept keys for a hard mask, differentiable in ``key_keep``
    (straight-through Gumbel masks). A query of an image with no kept key gets zeros (the caller drops it)."""
    b, n, c3 = qkv.shape
    q, k, v = qkv.view(b, n, 3, num_heads, c3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, N, N]
    keys = key_keep[:, None, None, :]
    with torch.no_grad():
        kept_max = scores.masked_fill(keys <= 0, float("-inf")).amax(-1, keepdim=True)
        kept_max = torch.where(torch.isfinite(kept_max), kept_max, scores.amax(-1, keepdim=True))
    weights = torch.exp(scores - kept_max) * keys
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    return (weights @ v).transpose(1, 2).reshape(b, n, c3 // 3)


def class_attention(qkv: Tensor, num_heads: int, layout: Layout, key_bias: Tensor | None = None) -> Tensor:
    """Packed ``qkv [T, 3C]`` -> ``[T, H]`` float32 attention of each image's first row (query) to
    every row of that image (keys; ``key_bias [T]`` added to their logits), softmax per image and head.
    Costs ``T*C`` MACs: one dot product per row, a segment max and a segment sum; no ``[N, N]`` matrix."""
    t, c3 = qkv.shape
    c, d = c3 // 3, c3 // 3 // num_heads
    q = qkv[:, :c].float().view(t, num_heads, d)
    k = qkv[:, c:2 * c].float().view(t, num_heads, d)
    image = layout.image_index
    q_first = q[layout.first_rows][image]  # [T, H, d]: each row sees its image's first query
    logits = (q_first * k).sum(-1) * d ** -0.5 + (0 if key_bias is None else key_bias.float()[:, None])  # [T, H]
    seg_max = torch.full((layout.batch_size, num_heads), float("-inf"), device=qkv.device)
    seg_max = seg_max.scatter_reduce(0, image[:, None].expand(-1, num_heads), logits, "amax")
    e = torch.exp(logits - seg_max[image])
    seg_sum = torch.zeros(layout.batch_size, num_heads, device=qkv.device).index_add_(0, image, e)
    return e / seg_sum[image]


# ---------------------------------------------------------------- contexts handed to blocks
@dataclass(frozen=True)
class DenseContext:
    def __call__(self, qkv: Tensor, num_heads: int) -> Tensor:
        return dense_attention(qkv, num_heads)

    def queries(self, qkv: Tensor, num_heads: int, query_keep: Tensor) -> Tensor:
        """One image ``qkv [1, N, 3C]``, ``query_keep [N]`` bool -> ``[1, N_q, C]``."""
        layout = Layout.uniform(1, qkv.shape[1], qkv.device)
        return query_subset_attention(qkv[0], num_heads, layout, query_keep)[None]


@dataclass(frozen=True)
class VarlenContext:
    layout: Layout
    backend: str = "loop"
    pad_to: tuple[int, ...] | None = None  # each image's own token count (``padded``: its padded length)

    def __call__(self, qkv: Tensor, num_heads: int) -> Tensor:
        return varlen_attention(qkv, num_heads, self.layout, self.backend, pad_to=self.pad_to)

    def queries(self, qkv: Tensor, num_heads: int, query_keep: "Tensor | tuple[Tensor, Layout]") -> Tensor:
        """Packed ``qkv [T, 3C]`` and the kept query rows -> ``[T_q, C]`` (``query_subset_attention``)."""
        return query_subset_attention(qkv, num_heads, self.layout, query_keep, self.backend, self.pad_to)


@dataclass(frozen=True)
class CapacityContext:
    """Capacity rows (``tokens.CapacityRows``): attention with the offsets on the device."""
    rows: CapacityRows
    backend: str = "padded"

    def __call__(self, qkv: Tensor, num_heads: int) -> Tensor:
        return capacity_attention(qkv, num_heads, self.rows, self.backend)


@dataclass(frozen=True)
class KeyMaskedContext:
    key_keep: Tensor  # [B, N]

    def __call__(self, qkv: Tensor, num_heads: int) -> Tensor:
        return masked_attention(qkv, num_heads, self.key_keep)


class KeyBiasContext:
    """Adds ``bias[j]`` to every attention logit of key ``j`` (ToMe's proportional attention:
    ``log size_j``) on any backend: as SDPA's float mask where the backend passes one (dense, loop,
    padded), else by one extra channel per head: ``q' = [q sqrt(D'/D), 1, 0..]``,
    ``k' = [k, bias sqrt(D'), 0..]``, ``v' = [v, 0..]`` with ``D' = D + 8`` (fused kernels want
    multiples of 8), so ``<q', k'> / sqrt(D') = <q, k> / sqrt(D) + bias``. ``bias``: qkv's leading shape."""

    def __init__(self, inner: "DenseContext | VarlenContext | KeyMaskedContext", bias: Tensor):
        self.inner, self.bias = inner, bias

    def __call__(self, qkv: Tensor, num_heads: int) -> Tensor:
        inner = self.inner
        if isinstance(inner, DenseContext):  # SDPA takes the bias as a float mask (nearly free on CPU)
            return dense_attention(qkv, num_heads, self.bias)
        if isinstance(inner, VarlenContext) and (inner.layout.is_uniform or inner.backend in KEY_BIAS_BACKENDS):
            return varlen_attention(qkv, num_heads, inner.layout, inner.backend, self.bias, inner.pad_to)
        return self._widened(qkv, num_heads)

    def _widened(self, qkv: Tensor, num_heads: int) -> Tensor:
        *lead, c3 = qkv.shape
        c = c3 // 3
        d = c // num_heads
        dp = d + 8
        q, k, v = qkv.view(*lead, 3, num_heads, d).unbind(-3)
        zeros = qkv.new_zeros(*lead, num_heads, 8)
        q_extra, k_extra = zeros.clone(), zeros.clone()
        q_extra[..., 0] = 1.0
        k_extra[..., 0] = (self.bias.to(qkv.dtype) * dp ** 0.5)[..., None]
        widened = torch.stack([torch.cat([q * (dp / d) ** 0.5, q_extra], -1), torch.cat([k, k_extra], -1),
                               torch.cat([v, zeros], -1)], -3)
        out = self.inner(widened.reshape(*lead, 3 * num_heads * dp), num_heads)
        return out.view(*lead, num_heads, dp)[..., :d].reshape(*lead, c)


class RecordingContext:
    """Wraps another context and keeps the ``qkv`` it was given (``[..., 3C]``), so a pruning method
    can read the block's class-token attention row or value norms without a second attention."""

    def __init__(self, inner: "DenseContext | VarlenContext | KeyMaskedContext"):
        self.inner = inner
        self.qkv: Tensor | None = None

    def __call__(self, qkv: Tensor, num_heads: int) -> Tensor:
        self.qkv = qkv
        return self.inner(qkv, num_heads)


AttentionContext = DenseContext | VarlenContext | CapacityContext | KeyMaskedContext | RecordingContext
