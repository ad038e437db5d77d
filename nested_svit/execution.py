"""The three executions of one block on a feature map with a keep mask (DESIGN.md).

Each takes the full feature map ``x`` (packed ``[T, C]``), the block, ``keep`` (``[T]``: bool, or
float {0, 1} for ``masked``; ``None`` = every token) and ``lengths`` (the kept rows per image on the
host, when the caller knows them: no device read then) and returns the new feature map.
Tokens not kept keep their previous values (preserve), so any later gate may pick them again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from .attention import (CapacityContext, DenseContext, KeyBiasContext, KeyMaskedContext, RecordingContext,
                        VarlenContext, class_attention)
from .layers import Block
from .tokens import (CapacityRows, Layout, Packed, capacity_rows, gather, kept_rows, pad, scatter, scatter_capacity,
                     unpad)

EXECUTIONS = ("packed", "masked", "reference")


class MethodHooks(Protocol):
    """What an execution asks a pruning method's per-forward state (``methods.base.MethodRun``
    implements it; see there for the meaning of each hook)."""

    def records(self, i: int) -> bool: ...

    def has_mid_selection(self, i: int) -> bool: ...

    def selects_queries(self, i: int) -> bool: ...

    def select_queries(self, i: int, record: "AttentionRecord") -> Tensor: ...

    def host_counts(self, mask: Tensor) -> Sequence[int] | None: ...

    def key_bias(self, i: int) -> Tensor | None: ...

    def attention_probs(self, i: int) -> Tensor | None: ...

    def after_attention(self, i: int, y: Tensor, record: "AttentionRecord", before: Tensor) -> Tensor | None: ...

    def after_block(self, i: int, record: "AttentionRecord | None") -> None: ...


@dataclass
class AttentionRecord:
    """Block ``i``'s attention input over the rows it processed.

    rows: ``[Ta]`` int64 rows of the full map (each image's rows in map order, so the class token is
    each image's first row when the model has one); layout: per-image ``Ta`` ranges; qkv: ``[Ta, 3C]``;
    key_bias: ``[Ta]`` what the block's attention added to each row's key logits (None: nothing).
    """

    rows: Tensor
    layout: Layout
    qkv: Tensor
    num_heads: int
    key_bias: Tensor | None = None
    _probs: Tensor | None = field(default=None, repr=False)

    def class_probs(self) -> Tensor:
        """``[Ta, H]`` float32: softmax over each image's rows of its first row's (class token's)
        attention logits (with the key bias), i.e. row 0 of every head's attention matrix, per image."""
        if self._probs is None:
            self._probs = class_attention(self.qkv, self.num_heads, self.layout, self.key_bias)
        return self._probs

    def mean_keys(self) -> Tensor:
        """``[Ta, d]`` float32 keys averaged over the heads (ToMe's and ATC's similarity metric)."""
        c = self.qkv.shape[-1] // 3
        return self.qkv[:, c:2 * c].float().view(-1, self.num_heads, c // self.num_heads).mean(1)

    def value_norms(self) -> Tensor:
        """``[Ta]`` float32 L2 norm of each row's value vector (all heads together)."""
        c = self.qkv.shape[-1] // 3
        return self.qkv[:, 2 * c:].float().norm(dim=-1)


def run_packed(block: Block, x: Packed, keep: Tensor | None, backend: str, lengths: Sequence[int] | None = None,
               method: MethodHooks | None = None, index: int = -1) -> Packed:
    """Gather the active tokens of all images, run the block once on ``[T_active, C]`` with
    variable-length attention, scatter back. No compute on pruned tokens. With a pruning ``method``
    that reads block ``index``'s attention or selects between attention and MLP, the block runs in
    two halves around it (``_run_split``); one that picks the block's queries from its ``qkv`` gets
    attention and MLP for those rows only (``_run_query_subset``)."""
    if method is not None and method.selects_queries(index):
        return _run_query_subset(block, x, keep, lengths, method, index, backend)
    if _splits(method, index):
        return _run_split(block, x, keep, lengths, method, index,  # type: ignore[arg-type]
                          lambda a, ctx: block.attention_residual(a.values, ctx),
                          lambda a: block.mlp_residual(a.values, a.layout),
                          lambda layout: VarlenContext(layout, backend, x.layout.lengths))
    active = gather(x, keep, lengths)
    out = block(active.values, VarlenContext(active.layout, backend, x.layout.lengths))
    return scatter(x, active.with_values(out), inplace=not torch.is_grad_enabled())


def run_capacity(block: Block, x: Packed, keep: Tensor, capacity: int, slots_of_map: Tensor,
                 backend: str) -> tuple[Packed, CapacityRows]:
    """The packed execution with a fixed row count: the first ``capacity`` kept rows of ``keep [T]``
    and padding run through the block (attention: ``attention.capacity_attention`` with ``backend``),
    and are written back in place. No host read; static shapes for a given map. -> (the map, the
    rows, whose ``overflow`` says whether rows were cut)."""
    rows = capacity_rows(keep, x.layout, capacity, slots_of_map)
    gathered = x.values.index_select(0, rows.index)
    out = block(gathered, CapacityContext(rows, backend))
    return scatter_capacity(x, rows, gathered, out), rows


def run_reference(block: Block, x: Packed, keep: Tensor | None, backend: str, lengths: Sequence[int] | None = None,
                  method: MethodHooks | None = None, index: int = -1) -> Packed:
    """Per-image loop: each image's kept tokens through the plain block as a batch of one."""
    if method is not None and method.selects_queries(index):
        return _run_query_subset(block, x, keep, lengths, method, index, None)
    if _splits(method, index):
        return _run_split(block, x, keep, lengths, method, index,  # type: ignore[arg-type]
                          lambda a, ctx: _per_image(a, lambda seq: block.attention_residual(seq, ctx)),
                          lambda a: _per_image(a, block.mlp_residual),
                          lambda layout: _PerImageRecording(),
                          per_image=True)
    out = x.values.clone()
    for start, length in zip(x.layout.starts, x.layout.lengths):
        rows = torch.arange(start, start + length, device=x.values.device)
        if keep is not None:
            rows = rows[keep[start:start + length].bool()]
        if rows.numel():
            out[rows] = block(x.values[rows].unsqueeze(0), DenseContext())[0]
    return Packed(out, x.layout)


def _splits(method: MethodHooks | None, index: int) -> bool:
    """Whether block ``index`` runs in two halves: the method reads its attention, selects between
    the halves, biases its keys or gives its probabilities (the split path applies both)."""
    if method is None:
        return False
    return (method.records(index) or method.has_mid_selection(index) or method.selects_queries(index)
            or method.key_bias(index) is not None or method.attention_probs(index) is not None)


def _run_query_subset(block: Block, x: Packed, keep: Tensor | None, lengths: Sequence[int] | None,
                      method: MethodHooks, index: int, backend: str | None) -> Packed:
    """ATS's block: ``qkv`` of the active rows, the method picks the query rows from it, attention and
    the MLP run for those rows only (keys and values: every active row). Packed (``backend``) or,
    with ``backend=None``, one image at a time (the reference). Other rows keep their values."""
    active = gather(x, keep, lengths)
    rows = active.index if active.index is not None else torch.arange(x.values.shape[0], device=x.values.device)
    if backend is None:
        per_image = [block.qkv_of(seq.unsqueeze(0))[0] for seq in active.unbind()]
        qkv = torch.cat(per_image, 0) if per_image else active.values.new_zeros(0, 3 * x.values.shape[-1])
    else:
        qkv = block.qkv_of(active.values)
    record = AttentionRecord(rows, active.layout, qkv, block.attn.num_heads)
    chosen = method.select_queries(index, record)  # [T] bool over the map's rows
    query_keep = chosen[rows]
    if backend is None:
        outs = []
        for seq, part, q_keep in zip(active.unbind(), torch.split(qkv, list(active.layout.lengths)),
                                     torch.split(query_keep, list(active.layout.lengths))):
            if q_keep.any():
                h = block.attend(seq.unsqueeze(0), part.unsqueeze(0), DenseContext(), q_keep)
                outs.append(block.mlp_residual(h)[0])
        out = torch.cat(outs, 0) if outs else x.values[:0]
        y = x.values.clone() if torch.is_grad_enabled() else x.values
        y[rows[query_keep]] = out
    else:  # one read of the picked counts (ATS's are data-dependent) sizes everything after it
        known = method.host_counts(chosen)
        q_index, q_layout = kept_rows(query_keep, active.layout, known)
        if known is None:
            method.record_counts(chosen, list(q_layout.lengths))
        h = block.attend(active.values, qkv, VarlenContext(active.layout, backend, x.layout.lengths),
                         (q_index, q_layout))
        out = block.mlp_residual(h, q_layout)
        y = x.values.clone() if torch.is_grad_enabled() else x.values
        y[rows.index_select(0, q_index)] = out
    method.after_block(index, record)
    return Packed(y, x.layout)


def _per_image(a: Packed, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn`` on each image's rows as a dense batch of one -> packed ``[T, C]``."""
    parts = [fn(seq.unsqueeze(0))[0] for seq in a.unbind() if seq.shape[0]]
    return torch.cat(parts, 0) if parts else a.values[:0]


class GivenProbs:
    """Attention with the probabilities a method gives (``MethodRun.attention_probs``): ``probs [B, H, L, L]``,
    image ``b``'s active rows in map order, -> ``probs @ v``. Called with packed ``qkv [T, 3C]`` of
    ``layout`` or, in the reference execution, one image ``[1, n, 3C]`` at a time, in order."""

    def __init__(self, probs: Tensor, layout: Layout) -> None:
        self.probs, self.layout, self.image = probs, layout, 0

    def __call__(self, qkv: Tensor, num_heads: int) -> Tensor:
        c = qkv.shape[-1] // 3
        if qkv.dim() == 3:  # one image of the reference execution
            n = qkv.shape[1]
            v = qkv[0, :, 2 * c:].reshape(n, num_heads, -1).transpose(0, 1)  # [H, n, d]
            p, self.image = self.probs[self.image, :, :n, :n], self.image + 1
            return (p.to(v.dtype) @ v).transpose(0, 1).reshape(1, n, c)
        v = pad(qkv[:, 2 * c:], self.layout, length=self.probs.shape[-1])  # [B, L, C]
        v = v.view(v.shape[0], v.shape[1], num_heads, -1).transpose(1, 2)  # [B, H, L, d]
        out = (self.probs.to(v.dtype) @ v).transpose(1, 2).reshape(v.shape[0], -1, c)
        return unpad(out, self.layout)


class _PerImageRecording:
    """Dense attention per image that keeps every image's ``qkv``, concatenated like packed rows;
    ``bias``: the packed rows' key bias (consumed image by image); ``given``: probabilities to use."""

    def __init__(self) -> None:
        self.parts: list[Tensor] = []
        self.bias: Tensor | None = None
        self.given: GivenProbs | None = None
        self.used = 0

    def __call__(self, qkv: Tensor, num_heads: int) -> Tensor:
        self.parts.append(qkv.reshape(-1, qkv.shape[-1]))
        if self.given is not None:
            return self.given(qkv, num_heads)
        if self.bias is None:
            return DenseContext()(qkv, num_heads)
        n = qkv.shape[-2]
        bias, self.used = self.bias[self.used:self.used + n], self.used + n
        return KeyBiasContext(DenseContext(), bias.view(qkv.shape[:-1]))(qkv, num_heads)

    @property
    def qkv(self) -> Tensor:
        return torch.cat(self.parts, 0)


def _run_split(block: Block, x: Packed, keep: Tensor | None, lengths: Sequence[int] | None, method: MethodHooks,
               index: int, attention: Callable, mlp: Callable[[Packed], Tensor], context: Callable[[Layout], object],
               per_image: bool = False) -> Packed:
    """Attention half on the active rows, the method's record / selection, MLP half on the rows it
    keeps. Rows dropped between the halves keep their post-attention value in the map."""
    active = gather(x, keep, lengths)
    rows = active.index if active.index is not None else torch.arange(x.values.shape[0], device=x.values.device)
    ctx = context(active.layout)
    bias, probs = method.key_bias(index), method.attention_probs(index)
    given = None if probs is None else GivenProbs(probs, active.layout)
    if per_image:
        recorder = ctx
        recorder.bias = None if bias is None else bias[rows]
        recorder.given = given
    else:
        recorder = RecordingContext(given or (ctx if bias is None else KeyBiasContext(ctx, bias[rows])))
    h = attention(active, recorder)
    record = AttentionRecord(rows, active.layout, recorder.qkv, block.attn.num_heads,
                             None if bias is None else bias[rows])
    mid = method.has_mid_selection(index)
    before = active.values  # a gathered copy, or the map itself, which is then not written (y is h)
    grad = torch.is_grad_enabled()
    if active.index is None:  # every row was processed: the attention half's output is the map
        y = h.clone() if grad else h
    else:
        y = x.values.clone() if grad else x.values  # inference: update the map in place
        y[rows] = h
    mlp_keep = method.after_attention(index, y, record, before) if mid else None
    if mlp_keep is None:
        out = mlp(Packed(h, active.layout))  # may update h in place (CPU inference)
        if y is h:
            y = out
        else:
            y[rows] = out
    else:
        sub = gather(Packed(y, x.layout), mlp_keep, method.host_counts(mlp_keep))
        if sub.values.shape[0]:
            y[sub.index] = mlp(sub)
    method.after_block(index, record)
    return Packed(y, x.layout)


def run_masked(block: Block, x: Packed, keep: Tensor | None, backend: str, lengths: Sequence[int] | None = None,
               method: MethodHooks | None = None, index: int = -1) -> Packed:
    """Training path (Eq. 1): dense ``[B, N, C]``; pruned keys masked out of every softmax;
    output ``M * block(x) + (1 - M) * x`` (differentiable in ``M``). Images of different token
    counts (mixed resolutions) run as one dense batch per image."""
    if _splits(method, index):
        raise NotImplementedError("the masked (training) execution runs SViT gates only; the baseline methods "
                                  "run in the packed and reference executions")
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
