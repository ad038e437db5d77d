"""ViT building blocks with timm parameter names, running on dense ``[B, N, C]`` or packed
``[T, C]`` rows alike: only attention needs to know how rows group into images, and it is told
by the context it is handed (``attention.py``)."""
from __future__ import annotations

import math
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .attention import AttentionContext
from .tokens import Layout


class PatchEmbed(nn.Module):
    """``[B, 3, H, W]`` -> ``[B, (H/p)*(W/p), C]`` by a stride-p convolution (timm ``patch_embed.proj``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size {p}; "
                             f"resize or crop to a multiple of {p}")
        return height // p, width // p

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
        self.grid(images.shape[-2], images.shape[-1])
        return self.proj(images).flatten(2).transpose(1, 2)


# On this CPU, MKL's fp32 GEMM rounds a row differently when it is given M in {1, 2, 3, 5, 6, 7, 9, 10, 11}
# rows than among 12 or more (measured for every ViT and gate shape; bf16 (oneDNN) rows never depend on M).
# A block that processes 5 tokens of one image alone must give the values it gives in a batch of 64.
INVARIANT_MIN_ROWS = 12
PREPACKED = torch.backends.mkldnn.is_available()  # CPU inference on oneDNN's prepacked weights (``Linear``)
# the dtypes oneDNN's prepacked linear runs on this CPU: bf16 needs AVX512BW/VL/DQ or AVX-NE-CONVERT (an
# AVX2-only CPU refuses it: such calls take F.linear)
PREPACKED_DTYPES = (torch.float32,) + ((torch.bfloat16,) if PREPACKED and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                                       else ())


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names) whose rows never depend on how many rows it is given:
    on CPU a call with fewer than ``INVARIANT_MIN_ROWS`` rows runs on zero-padded rows (a few hundred
    MACs more), so an image's values are the same alone and in any batch. CPU inference runs oneDNN's
    matmul on weights reordered once into its blocked layout (``PREPACKED``; what inductor's ``freezing``
    does) instead of MKL's GEMM or a reorder on every call: measured 1.05x for SViT-S in fp32, 1.01-1.03x
    in bf16, in-process and interleaved (bench/README.md). Compiled regions call the plain kernel (their
    values are recorded as compiled)."""

    int8: tuple[Tensor, Tensor] | None = None  # ``quantize_int8``: the weight as int8 ``[K, N]`` and its ``[N]`` scales

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.weight.dtype)  # a bf16 linear in an fp32 stream (``precision.set_precision``)
        width = x.shape[-1]
        rows = x.numel() // width if width else 0
        if x.device.type != "cpu" or rows == 0 or torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, width)
        counted = _get_current_dispatch_mode() is not None  # a FLOP or memory counter: the model's own ops
        if rows < INVARIANT_MIN_ROWS and not counted:
            flat = torch.cat([flat, flat.new_zeros(INVARIANT_MIN_ROWS - rows, width)])
        if self.int8 is not None and not torch.is_grad_enabled():
            out = self._int8_matmul(flat)
        elif PREPACKED and not torch.is_grad_enabled() and not counted and flat.dtype in PREPACKED_DTYPES:
            out = torch.ops.mkldnn._linear_pointwise(flat, self._packed_weight(), self.bias, "none", [], "")
        else:
            out = F.linear(flat, self.weight, self.bias)
        return out[:rows].view(*x.shape[:-1], out.shape[-1])

    def quantize_int8(self) -> None:
        """Inference in int8: the weight quantised once, symmetric per output channel; each call quantises
        its input per row (per token, so a row never depends on the other rows of its call: the integer
        matmul is exact, the scales are the row's own) and dequantises the int32 result to fp32."""
        w = self.weight.detach().float()
        scale = w.abs().amax(1).clamp_min(1e-12) / 127  # [N]
        self.int8 = (torch.round(w / scale[:, None]).to(torch.int8).t().contiguous(), scale)

    def _int8_matmul(self, flat: Tensor) -> Tensor:
        """``flat [M, K]`` fp32 -> ``[M, N]`` fp32 through ``torch._int_mm`` (VNNI on x86)."""
        weight, w_scale = self.int8  # type: ignore[misc]
        x = flat.float()
        scale = x.abs().amax(1, keepdim=True).clamp_min_(1e-12).div_(127)  # [M, 1]
        q = torch.round(x / scale).to(torch.int8)
        out = torch._int_mm(q, weight).float().mul_(scale).mul_(w_scale)
        return out if self.bias is None else out.add_(self.bias)

    def _packed_weight(self) -> Tensor:
        """The weight in oneDNN's blocked layout, reordered once (again when the weight changes)."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype)
        cache = self.__dict__.setdefault("_packed", _PackedWeight())
        if cache.key != key:
            cache.key, cache.weight = key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 0)
        return cache.weight


class _PackedWeight:
    """A ``Linear``'s prepacked weight; a copy or a pickle starts empty (the opaque tensor cannot be copied,
    and a copy's weight lives elsewhere)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.weight: Tensor | None = None

    def __deepcopy__(self, memo) -> "_PackedWeight":
        return _PackedWeight()

    def __reduce__(self):
        return (_PackedWeight, ())


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 on the last dimension."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_features, out_features or in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward_inplace_act(self, x: Tensor) -> Tensor:
        """Same values as ``forward``; GELU overwrites the hidden activations (no autograd)."""
        hidden = self.fc1(x)
        torch.ops.aten.gelu_(hidden)
        return self.fc2(hidden)


class Attention(nn.Module):
    """Multi-head self-attention; ``context`` says which rows attend to which."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3)
        self.proj = Linear(dim, dim)

    def forward(self, x: Tensor, context: AttentionContext) -> Tensor:
        return self.proj(context(self.qkv(x), self.num_heads))


MLP_CHUNK_BYTES = 8 * 2**20


def drop_path(branch: Tensor, rate: float, training: bool, layout: "Layout | None" = None) -> Tensor:
    """Stochastic depth: in training, zero a residual ``branch`` per image with probability ``rate``
    and scale the rest by ``1 / (1 - rate)`` (timm's DropPath); identity otherwise. ``branch``:
    dense ``[B, N, C]``, or packed rows ``[T, C]`` of ``layout``'s images."""
    if not training or rate <= 0.0:
        return branch
    if branch.dim() < 3:
        if layout is None:
            raise ValueError("drop path on packed rows needs their layout")
        keep = branch.new_empty(layout.batch_size).bernoulli_(1.0 - rate)
        return branch * (keep[layout.image_index] / (1.0 - rate))[:, None]
    keep = branch.new_empty((branch.shape[0],) + (1,) * (branch.dim() - 1)).bernoulli_(1.0 - rate)
    return branch * keep / (1.0 - rate)


def _layout_of(context: object) -> "Layout | None":
    """The packed layout an attention context (or the context it wraps) works on."""
    while context is not None:
        layout = getattr(context, "layout", None)
        if layout is not None:
            return layout
        context = getattr(context, "inner", None)
    return None


def _qkv_rows(block: "Block", x: Tensor) -> Tensor:
    """``qkv(norm1(x))`` on rows ``[T, C]`` (the compiled region before attention)."""
    return block.attn.qkv(block.norm1(x))


def _proj_residual_rows(block: "Block", x: Tensor, attended: Tensor) -> Tensor:
    """``x + proj(attended)`` on rows (the compiled region after attention, when a method selects
    between the halves)."""
    return x + block.attn.proj(attended)


def _mlp_residual_rows(block: "Block", x: Tensor) -> Tensor:
    """``x + mlp(norm2(x))`` on rows."""
    return x + block.mlp(block.norm2(x))


def _post_rows(block: "Block", x: Tensor, attended: Tensor) -> Tensor:
    """``h = x + proj(attended)``, then ``h + mlp(norm2(h))``: the whole block after attention."""
    h = x + block.attn.proj(attended)
    return h + block.mlp(block.norm2(h))


# One compiled graph per region for every block of one shape (dynamo passes a module's parameters as
# inputs), the row count dynamic; built on first use, so importing the package never touches the compiler.
# Each shape gets its own code object: dynamo counts recompilations per code object, and one process may
# run models of several widths, precisions and devices.
_COMPILED: dict[tuple, Callable] = {}
REGIONS = {"qkv": _qkv_rows, "proj_residual": _proj_residual_rows, "mlp_residual": _mlp_residual_rows,
           "post": _post_rows}


def compiled_region(name: str, block: "Block", x: Tensor) -> Callable:
    """``torch.compile`` of ``REGIONS[name]`` for blocks shaped as ``block`` on rows like ``x``
    (``fullgraph``: a graph break is an error, not a slow path)."""
    key = (name, x.shape[-1], block.mlp.fc1.out_features, block.attn.num_heads, float(block.norm1.eps), x.dtype,
           x.device.type)
    if key not in _COMPILED:
        fn = REGIONS[name]
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_COMPILED)}")
        _COMPILED[key] = torch.compile(types.FunctionType(code, fn.__globals__, code.co_name), fullgraph=True)
    return _COMPILED[key]


def _dynamic_rows(*rows: Tensor) -> tuple[Tensor, ...]:
    """Mark dim 0 (the row count) of each tensor dynamic: batches of any keep count share one graph."""
    for t in rows:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return rows


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.
    ``x``: ``[B, N, C]`` or packed ``[T, C]``. ``compiled``: inference on packed rows runs the dense
    math around attention as compiled regions (``compiled_region``); attention itself stays eager."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = 0.0  # stochastic depth rate in training (``TokenStack.set_drop_path``)
        self.compiled = False  # ``TokenStack.set_execution(..., compile=True)``

    def set_eps(self, eps: float) -> None:
        self.norm1.eps = self.norm2.eps = eps

    def compiles(self, x: Tensor) -> bool:
        """Whether ``x`` runs the compiled regions: a compiled block in inference (no autograd, eval
        mode) on packed rows ``[T, C]`` of at least 2 rows (dynamo specialises sizes 0 and 1), with no
        torch dispatch mode active (FLOP and memory counters use one; compiled code cannot run under it)."""
        return self.compiled and not self.training and not torch.is_grad_enabled() and x.dim() == 2 \
            and x.shape[0] >= 2 and _get_current_dispatch_mode() is None

    def forward(self, x: Tensor, context: AttentionContext) -> Tensor:
        if self.compiles(x):
            qkv = compiled_region("qkv", self, x)(self, *_dynamic_rows(x))
            return compiled_region("post", self, x)(self, *_dynamic_rows(x, context(qkv, self.attn.num_heads)))
        return self.mlp_residual(self.attention_residual(x, context), _layout_of(context))

    def attention_residual(self, x: Tensor, context: AttentionContext) -> Tensor:
        """``x + attn(norm1(x))``: the first half, after which a pruning method may select tokens."""
        return self.attend(x, self.qkv_of(x), context)

    def qkv_of(self, x: Tensor) -> Tensor:
        """``qkv(norm1(x))``: ``[..., 3C]``, what a method may read before the attention runs."""
        if self.compiles(x):
            return compiled_region("qkv", self, x)(self, *_dynamic_rows(x))
        return self.attn.qkv(self.norm1(x))

    def attend(self, x: Tensor, qkv: Tensor, context: AttentionContext,
               queries: "Tensor | tuple[Tensor, Layout] | None" = None) -> Tensor:
        """``x + proj(attention)`` for every row of ``x``, or with ``queries`` for those rows only: each
        kept row's query against every row's key and value (ATS); -> the kept rows ``[..., N_q, C]``.
        ``queries``: a bool mask over the rows (``[N]``, one dense image), or for packed rows the kept
        row indices and their layout (``tokens.kept_rows``)."""
        heads = self.attn.num_heads
        if queries is None:
            if self.compiles(x):
                return compiled_region("proj_residual", self, x)(self, *_dynamic_rows(x, context(qkv, heads)))
            out = self.attn.proj(context(qkv, heads))
            return x + drop_path(out, self.drop_path, self.training, _layout_of(context))
        out = self.attn.proj(context.queries(qkv, heads, queries))
        if isinstance(queries, tuple):
            index, q_layout = queries
            return x.index_select(0, index) + drop_path(out, self.drop_path, self.training, q_layout)
        return x[..., queries, :] + drop_path(out, self.drop_path, self.training)

    def mlp_residual(self, x: Tensor, layout: "Layout | None" = None) -> Tensor:
        """``x + mlp(norm2(x))``. Inference on CPU runs it over row chunks whose hidden activations
        stay cache-sized (<= MLP_CHUNK_BYTES), with GELU in place and the result added into ``x``:
        large hidden tensors otherwise cost page faults, memory traffic and peak memory on every
        call (see bench/README.md)."""
        if self.compiles(x):
            return compiled_region("mlp_residual", self, x)(self, *_dynamic_rows(x))
        if torch.is_grad_enabled() or (self.training and self.drop_path > 0) or x.device.type != "cpu":
            return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training, layout)
        rows = x.numel() // x.shape[-1]
        chunk = max(256, MLP_CHUNK_BYTES // (self.mlp.fc1.out_features * x.element_size()))
        flat = x.view(rows, x.shape[-1])  # x is this block's own fresh tensor: safe to update
        for start in range(0, rows, chunk):
            part = flat[start:start + chunk]
            part += self.mlp.forward_inplace_act(self.norm2(part))
        return x


def resize_pos_embed(pos_embed: Tensor, grid: tuple[int, int], num_prefix: int = 1) -> Tensor:
    """``[1, P + G0*G1, C]`` -> ``[1, P + grid[0]*grid[1], C]``: bicubic on the patch part (square source grid)."""
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    side = int(math.isqrt(patches.shape[1]))
    if side * side != patches.shape[1]:
        raise ValueError(f"pos_embed has {patches.shape[1]} patch positions, not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    c = patches.shape[-1]
    img = patches.reshape(1, side, side, c).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=grid, mode="bicubic", align_corners=False)
    patches = img.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], c).to(pos_embed.dtype)
    return torch.cat([prefix, patches], 1)
