"""The token stack shared by every model: patch embedding, ViT blocks and the selectors before them.

``TokenStack`` owns the parameters that carry timm's names (``patch_embed``, ``pos_embed``,
``cls_token``, ``blocks.{i}``, ``gates.{k}``) and the executions. ``BlockPass`` is one forward through
the blocks; it can run them in stretches (``run(x, start, stop)``), so a model that interleaves other
layers with the blocks (the ViT-Adapter detector backbone) uses the very same select -> block -> write
back loop as the classifier.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .attention import CAPACITY_BACKENDS, capacity_backend, resolve_backend
from .config import ViTConfig
from .execution import EXECUTIONS, RUNNERS, run_capacity
from .layers import Block, PatchEmbed, resize_pos_embed
from .methods import MethodRun, get_method
from .tokens import Packed, keep_counts, map_slots

Images = Tensor | Sequence[Tensor]
RunFactory = Callable[["BlockPass"], MethodRun]


@dataclass
class TokenUsage:
    """What each block processed.

    kept: ``[B, depth]`` int64 tokens processed per image per block (class token included; by the
    attention half when a method selects between attention and MLP, see ``kept_mlp``).
    total: ``[B]`` int64 tokens per image (virtual rows not counted).
    masks / decided: per gate, the ``[T]`` keep mask (float, straight-through when training) and
    which rows the gate decided on (not protected); used by the keep-ratio losses.
    """

    kept: Tensor
    total: Tensor
    gate_blocks: tuple[int, ...]
    masks: list[Tensor] = field(default_factory=list, repr=False)
    decided: list[Tensor] = field(default_factory=list, repr=False)
    kept_mlp: Tensor | None = None  # [B, depth] tokens each block's MLP processed, where a method selects
    # between attention and MLP (EViT, ATS); None: as ``kept``
    overflow: bool = False  # the capacity forward: a block's capacity was too small (the caller reruns exactly)

    @property
    def kept_after_selection(self) -> Tensor:
        """``[B, depth]`` tokens each block kept per image after its own selection: ``kept_mlp`` where a
        method selects between attention and MLP, else ``kept``."""
        return self.kept if self.kept_mlp is None else self.kept_mlp

    def keep_ratio(self) -> Tensor:
        """``[B, depth]`` kept / total."""
        return self.kept.float() / self.total.float().clamp_min(1).unsqueeze(1)

    def gate_keep_fraction(self) -> Tensor:
        """``[num_gates]``: batch-average fraction of decided tokens kept by each gate."""
        return torch.stack([(m.detach().float()[d]).mean() if d.any() else m.new_zeros(())
                            for m, d in zip(self.masks, self.decided)]) if self.masks else torch.zeros(0)

    def select(self, order: Sequence[int]) -> "TokenUsage":
        """The usage rows of images ``order`` (per-image fields only; masks are dropped)."""
        idx = torch.as_tensor(list(order), dtype=torch.int64)
        return TokenUsage(self.kept[idx], self.total[idx], self.gate_blocks,
                          kept_mlp=None if self.kept_mlp is None else self.kept_mlp[idx])


class TokenStack(nn.Module):
    """Patch embedding + blocks + selectors of ``config``; subclasses add what reads the tokens.
    ``method``: the pruning method's descriptor (``methods.Method``), ``options`` its checked options."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.method = get_method(config.pruning.method)
        self.options = self.method.resolve_options(config)
        self.config = config
        self.name = "custom"
        c = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c)) if config.class_token else None
        # without a class token the position table keeps its class row (unused), as DeiT/ViT-Adapter files do
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, c))
        self.blocks = nn.ModuleList(Block(c, config.num_heads, config.mlp_ratio, config.block_norm_eps)
                                    for _ in range(config.depth))
        self.gates = nn.ModuleList(self.method.make_selectors(config, self.options))
        self.slots = self.method.virtual_rows(config, self.options)  # extra rows per image (EViT's fused tokens)
        self.execution = "packed"
        self.backend = "auto"
        self.gates_open = False  # True: every gate keeps every token (dense behaviour, gate cost still paid)
        self.capacity: float | None = None  # the capacity forward's factor F (``set_execution``); None: exact
        self.keep_targets_in_use: tuple[float, ...] | None = None  # the targets the thresholds were calibrated to
        self.capacity_reruns = 0  # forwards whose capacity was too small, rerun with room for every row
        self.observed_keep: tuple[float, ...] | None = None  # the capacity forward's estimate (``Method.observe``)

    @property
    def dtype(self) -> torch.dtype:
        """The input dtype (images are cast to it); under ``set_precision`` parts may run in another."""
        return self.pos_embed.dtype

    def reduced_precision_modules(self) -> list[nn.Module] | None:
        """What ``set_precision`` casts to a reduced precision: None, the whole module except its
        ``decision_modules`` (a detector backbone's default); a classifier names its blocks' linears."""
        return None

    def decision_modules(self) -> list[nn.Module]:
        """The modules whose outputs decide what runs: the method's selectors (SViT's gates, DynamicViT's
        predictors). ``set_precision`` keeps them in fp32; they cast their input to their own dtype."""
        return [self.gates]

    @property
    def num_gates(self) -> int:
        return len(self.gates)

    @property
    def block_norm_eps(self) -> float:
        """The blocks' LayerNorm eps (a release's, where a checkpoint set it: ``Block.set_eps``)."""
        return float(self.blocks[0].norm1.eps)

    @property
    def prunes(self) -> bool:
        """Whether any block runs on fewer than all tokens (a method with places to act)."""
        return bool(self.config.gate_blocks)

    def set_drop_path(self, rate: float) -> "TokenStack":
        """Stochastic depth for training: block ``i`` drops its residual branches with probability
        ``rate * i / (depth - 1)`` (timm's linear rule); 0 turns it off."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        depth = len(self.blocks)
        for i, block in enumerate(self.blocks):
            block.drop_path = rate * i / max(depth - 1, 1)
        return self

    def training_execution(self) -> str:
        """The execution training runs in, as the method says (SViT's gates: masked, straight-through
        Gumbel masks, Eq. 1; the parameter-free baselines: packed, through their own hard selection, as
        their authors' code does); a method that cannot train raises its reason."""
        if self.method.train_execution is None:
            raise ValueError(self.method.train_refusal or f"{self.method.title} cannot be trained here")
        return self.method.train_execution

    def set_execution(self, mode: str, backend: str | None = None, compile: bool | None = None,
                      capacity: float | None = None) -> "TokenStack":
        """``packed`` (inference), ``masked`` (training, Eq. 1) or ``reference`` (per-image loop);
        ``backend``: variable-length attention backend for ``packed`` (``auto`` or one of
        ``attention.BACKENDS``); ``compile``: run each block's dense math on the packed rows as
        compiled regions, the row count dynamic (``layers.compiled_region``; inference in ``packed``
        only; None: as it was); ``capacity``: the capacity forward with factor ``F`` (> 0; 0 turns it
        off; None: as it was): each selecting block processes a fixed ``ceil(F * expected rows)`` rows
        (``MethodRun.expected_rows``, capped at all rows) with no host read, a too small capacity is
        found once at the end of the forward and that forward rerun with room for every row (``capacity_reruns``)."""
        if mode not in EXECUTIONS:
            raise ValueError(f"unknown execution {mode!r}; choose from {EXECUTIONS}")
        if compile and mode != "packed":
            raise ValueError(f"compile=True runs the packed inference execution only, not {mode!r}")
        if capacity and mode != "packed":
            raise ValueError(f"capacity runs the packed inference execution only, not {mode!r}")
        if backend is not None:
            resolve_backend(backend, self.pos_embed.device, self.dtype)  # validates
        if capacity is not None and capacity != 0:
            self._check_capacity(capacity, self.backend if backend is None else backend)
        self.execution = mode
        if compile is not None or mode != "packed":
            for block in self.blocks:
                block.compiled = bool(compile) and mode == "packed"
        if backend is not None:
            self.backend = backend
        if capacity is not None or mode != "packed":
            self.capacity = float(capacity) if capacity and mode == "packed" else None
        return self

    @contextlib.contextmanager
    def exact_forward(self) -> Iterator[None]:
        """Within: the exact forward (the capacity forward off)."""
        saved, self.capacity = self.capacity, None
        try:
            yield
        finally:
            self.capacity = saved

    @contextlib.contextmanager
    def uncapped_forward(self) -> Iterator[None]:
        """Within: the capacity forward with room for every row, to rerun a batch that overflowed: the same
        arithmetic as a batch that fit (the capacity grid), so an image's values never depend on whether
        its batch mates made the batch overflow."""
        saved, self.capacity = self.capacity, math.inf
        try:
            yield
        finally:
            self.capacity = saved

    def _check_capacity(self, factor: float, backend: str) -> None:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
            raise ValueError(f"capacity must be a finite factor > 0 (1.2: 20% above the expected rows), got {factor!r}")
        if self.method.counts_on_device and not self.method.capacity:
            raise ValueError(f"{self.method.title} chooses its counts inside the block from the attention: the "
                             "capacity forward runs SViT's gates and the fixed-count methods")
        if backend not in ("auto",) + CAPACITY_BACKENDS:
            raise ValueError(f"the capacity forward keeps the offsets on the device: attention backend 'auto', "
                             f"'padded' or 'varlen', not {backend!r} (it needs every length on the host)")

    # ------------------------------------------------------------------ embedding
    def embed_batch(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, (1 +) H/p * W/p, C]`` (class token first when the model has one)."""
        grid = self.patch_embed.grid(images.shape[-2], images.shape[-1])
        x = self.patch_embed(images)
        pos = resize_pos_embed(self.pos_embed, grid)
        if self.cls_token is None:
            x = x + pos[:, 1:]
        else:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + pos
        if self.slots:  # virtual rows at the end, inactive until a method writes them
            x = torch.cat([x, x.new_zeros(x.shape[0], self.slots, x.shape[-1])], 1)
        return x

    def embed(self, images: Images) -> Packed:
        """Images -> packed feature map. A tensor is a uniform batch; a list may mix resolutions
        (images of one size are embedded together)."""
        if isinstance(images, Tensor):
            return Packed.from_dense(self.embed_batch(images))
        if len(images) == 0:
            raise ValueError("empty list of images")
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            if img.ndim != 3:
                raise ValueError(f"image {i}: expected [C, H, W], got shape {tuple(img.shape)}")
            by_size.setdefault(tuple(img.shape), []).append(i)
        seqs: list[Tensor] = [None] * len(images)  # type: ignore[list-item]
        for idx in by_size.values():
            for i, seq in zip(idx, self.embed_batch(torch.stack([images[i] for i in idx]))):
                seqs[i] = seq
        return Packed.from_list(seqs)

    def begin(self, x: Packed, run: RunFactory | None = None) -> "BlockPass":
        """Start a forward through the blocks on feature map ``x`` (its layout fixes the images);
        ``run``: the method's per-forward state to use (default: ``method.run``)."""
        return BlockPass(self, x, run)

    # ------------------------------------------------------------------ calibration
    def forward_usage(self, images: Images, run: RunFactory | None = None) -> TokenUsage:
        """Run far enough to know every selection; subclasses with other layers override."""
        x = self.embed(images)
        block_pass = self.begin(x, run)
        block_pass.run(x, 0, self.config.depth)
        return block_pass.usage()

    def calibrate_keep(self, images: Images, targets: Sequence[float] | None = None) -> list[float]:
        """Shift the method's thresholds so that the batch-average keep fractions on ``images`` equal
        ``targets`` (default: the config's keep targets), without retraining (SViT:
        ``methods.svit.calibrate_gates``). -> the fractions reached."""
        if self.method.calibrate is None:
            raise ValueError(f"{self.method.title} keeps its own token counts: it has no thresholds to calibrate "
                             "(set its keep targets in the config instead)")
        return self.method.calibrate(self, images, targets)


class BlockPass:
    """One forward through ``stack``'s blocks: the pruning method (``methods/``) says which rows each
    block processes, the execution runs the block on them, and usage is recorded. ``run`` may be
    called on consecutive stretches of blocks, with other layers changing the feature map in
    between (same layout).

    Row bookkeeping the methods read: ``layout`` (the whole map), ``protect`` (class-token rows),
    ``slot_mask`` / ``slot_rows [B, S]`` (virtual rows, EViT's fused tokens), ``patches [B]`` (each
    image's patch-token count, the base of the baselines' keep counts)."""

    def __init__(self, stack: TokenStack, x: Packed, run: RunFactory | None = None):
        self.stack = stack
        self.runner = RUNNERS[stack.execution]
        self.backend = resolve_backend(stack.backend, x.values.device, x.values.dtype)
        self.layout = x.layout
        device = x.values.device
        self.protect = torch.zeros(self.layout.total, dtype=torch.bool, device=device)
        if stack.cls_token is not None:
            self.protect[self.layout.first_rows] = True
        ends = self.layout.offsets[1:]
        self.slot_rows = ends[:, None] - stack.slots + torch.arange(stack.slots, device=device)[None, :]
        self.slot_mask = torch.zeros_like(self.protect)
        self.slot_mask[self.slot_rows.reshape(-1)] = True
        lengths = torch.tensor(self.layout.lengths, dtype=torch.int64)
        self.lengths = lengths - stack.slots  # real tokens per image (host)
        self.patches = self.layout.offsets.diff() - stack.slots - int(stack.cls_token is not None)  # on the device
        self.kept_cols: list[Tensor] = []
        self.mlp_cols: list[Tensor] = []
        self.method: MethodRun = (run or stack.method.run)(self)  # the method's state for this forward
        self.next_block = 0
        self.capacity = stack.capacity if stack.execution == "packed" else None  # the capacity forward's F
        self.overflow = torch.zeros((), dtype=torch.bool, device=device)  # [] a capacity was too small
        self._slots_of_map: Tensor | None = None

    def run(self, x: Packed, start: int, stop: int) -> Packed:
        """Blocks ``start .. stop-1`` on ``x`` -> new feature map."""
        if start != self.next_block:
            raise ValueError(f"blocks must run in order: expected block {self.next_block}, got {start}")
        for i in range(start, stop):
            keep = self.method.before_block(i, x)
            if self.capacity is not None and keep is not None and self.method.host_counts(keep) is None:
                x = self._run_capacity(i, x, keep)
                continue
            if self.capacity is not None and keep is None:  # the counts stay where the others are
                self.kept_cols.append(self.layout.offsets.diff() - self.stack.slots)
                self.mlp_cols.append(self.kept_cols[-1])
                x = self.runner(self.stack.blocks[i], x, None, self.backend, None, self.method, i)
                continue
            lengths = None if keep is None else self._host_counts(keep)
            self.kept_cols.append(self.lengths if keep is None else torch.tensor(lengths, dtype=torch.int64))
            x = self.runner(self.stack.blocks[i], x, keep, self.backend, lengths, self.method, i)
            selects = self.method.has_mid_selection(i) or self.method.selects_queries(i)
            mlp_rows = self.method.active if selects else None
            self.mlp_cols.append(self.kept_cols[-1] if mlp_rows is None else
                                 torch.tensor(self._host_counts(mlp_rows), dtype=torch.int64))
        self.next_block = stop
        return x

    def _run_capacity(self, i: int, x: Packed, keep: Tensor) -> Packed:
        """Block ``i`` on a fixed number of rows (``execution.run_capacity``): ``ceil(F * expected rows)``,
        capped at every row; the kept counts and the overflow stay on the device."""
        if self.method.records(i) or self.method.has_mid_selection(i) or self.method.selects_queries(i):
            raise ValueError(f"{self.stack.method.title}'s block {i} selects inside the block: no capacity forward")
        total = self.layout.total
        expected = self.method.expected_rows(i)
        uncapped = expected is None or math.isinf(self.capacity)
        capacity = total if uncapped else min(total, max(1, math.ceil(self.capacity * expected)))
        if self._slots_of_map is None:
            self._slots_of_map = map_slots(self.layout)
        x, rows = run_capacity(self.stack.blocks[i], x, keep, capacity, self._slots_of_map,
                               capacity_backend(self.backend))
        self.overflow = self.overflow | rows.overflow
        self.kept_cols.append(rows.counts)
        self.mlp_cols.append(rows.counts)
        return x

    def device_usage(self) -> tuple[Tensor, Tensor, Tensor]:
        """The capacity forward's usage, not read: ``kept [B, blocks]``, ``kept_mlp [B, blocks]`` (int64)
        and ``overflow []`` (bool), on the map's device."""
        device = self.layout.offsets.device

        def on_device(col: Tensor) -> Tensor:
            if col.device == device:
                return col
            if col.numel() and bool((col == col[0]).all()):  # a fill, not a copy: a CUDA graph captures it
                return torch.full(col.shape, int(col[0]), dtype=torch.int64, device=device)
            return col.to(device, non_blocking=True)

        def stacked(cols: list[Tensor]) -> Tensor:
            if not cols:
                return torch.zeros(self.layout.batch_size, 0, dtype=torch.int64, device=device)
            return torch.stack([on_device(c) for c in cols], 1)

        return stacked(self.kept_cols), stacked(self.mlp_cols), self.overflow

    def _host_counts(self, keep: Tensor) -> list[int]:
        """Rows of each image ``keep`` selects, on the host: from the method when it knows them (fixed
        counts), else read from the device (the selection's one sync), and then told to the method."""
        lengths = self.method.host_counts(keep)
        if lengths is None:
            lengths = keep_counts(keep, self.layout).tolist()
            self.method.record_counts(keep, lengths)
        return list(lengths)

    def readout(self, x: Packed) -> Packed:
        """The map a head or neck reads: with ``remove_pruned`` the rows not active at the end are zero
        (the paper's "remove"); otherwise they keep their last value ("preserve"). The class token
        is read as it is either way (SViT's last gate may prune it). Virtual rows are dropped by the
        caller (``slot_mask``)."""
        mask = self.method.readout_mask()
        if not self.stack.config.remove_pruned or mask is None:
            return x
        return x.with_values(x.values * (mask | self.protect).to(x.values.dtype)[:, None])

    def spread(self, x: Packed) -> Packed:
        """The map with every row holding its token's current value (``MethodRun.spread``: merged rows
        read their owner's), for a layer that reads the whole patch grid."""
        values = self.method.spread(x.values)
        return x if values is x.values else x.with_values(values)

    def gather_back(self, x: Packed) -> Packed:
        """The map after such a layer wrote every row: merged tokens back in their rows (``MethodRun.gather_back``)."""
        values = self.method.gather_back(x.values)
        return x if values is x.values else x.with_values(values)

    def usage(self) -> TokenUsage:
        """What the blocks processed; in the capacity forward this is its one host read (the counts and
        the overflow flag together)."""
        if self.capacity is not None:
            kept, kept_mlp, overflow = self.device_usage()
            flat = torch.cat([kept.flatten(), kept_mlp.flatten(), overflow.view(1).to(torch.int64)]).cpu()
            n = kept.numel()
            return TokenUsage(flat[:n].view(kept.shape), self.lengths, self.stack.config.gate_blocks,
                              self.method.masks, self.method.decided, flat[n:2 * n].view(kept.shape),
                              overflow=bool(flat[-1]))
        empty = torch.zeros(len(self.lengths), 0, dtype=torch.int64)
        kept = torch.stack(self.kept_cols, 1) if self.kept_cols else empty
        kept_mlp = torch.stack(self.mlp_cols, 1) if self.mlp_cols else empty
        return TokenUsage(kept, self.lengths, self.stack.config.gate_blocks, self.method.masks, self.method.decided,
                          kept_mlp)
