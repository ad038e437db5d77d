"""The protocol every token-pruning method implements: SViT's gates and the baselines alike.

``BlockPass`` (stack.py) drives one forward through the blocks and asks the method's per-forward run
(``MethodRun``) at four points of every block ``i``:

1. ``before_block(i, x)``: the rows block ``i`` processes, ``[T]`` mask over the whole map or None
   for all (SViT gates, DynamicViT predictors, Evo-ViT's stage selection);
2. ``records(i)``: whether the method reads block ``i``'s attention (``execution.AttentionRecord``:
   the class-token attention row, value norms), computed from the block's own ``qkv``, never from a
   materialised attention matrix;
3. ``after_attention(i, y, record, before)``: after ``x + attn(norm1(x))`` and before the MLP, the rows the
   MLP processes (EViT's top-k and fused token, ATS's sampling); may write virtual rows of ``y``;
4. ``after_block(i, record)``: observe (Evo-ViT's running scores).

The executions (execution.py) own gather -> block -> scatter; a method only returns masks over the
packed map's rows, so every method runs in the same packed and reference executions. Rows a method
drops keep their last value in the map (preserve); ``readout_mask`` says which rows were active at
the end, for the "remove" readout that zeroes the others.

Everything else the library needs to know about a method is its ``Method`` descriptor (one per
``methods/<name>.py``, listed in ``methods/__init__.py``): the engine, trainers, benchmarks, the CLI and
the detector ask it, and never compare a method's name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..config import LEGACY_OPTION_DEFAULTS, ViTConfig
from ..execution import AttentionRecord
from ..tokens import Packed


def segment_rank(scores: Tensor, image: Tensor, num_images: int, descending: bool = True) -> Tensor:
    """``[R]`` rank (0 = best) of each score within its image (``image [R]`` in ``0..num_images-1``,
    sorted ascending, as packed rows are). Ties keep row order. No device sync."""
    order = torch.sort(scores, descending=descending, stable=True).indices
    if order.numel() == 0:
        return order
    order = order[torch.sort(image[order], stable=True).indices]  # group by image, score order inside
    counts = torch.zeros(num_images, dtype=torch.int64, device=image.device).index_add_(0, image, torch.ones_like(image))
    offsets = torch.cumsum(counts, 0) - counts
    start = offsets[image[order]]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - start
    return rank


class MethodRun:
    """Per-forward state of a pruning method; the defaults are the dense model's. ``masks`` /
    ``decided``: per selection, the ``[T]`` rows kept and the rows it chose from (``TokenUsage``);
    ``active``: the rows a method with a running active set keeps (None: not such a method)."""

    active: Tensor | None = None

    def __init__(self, block_pass: "object") -> None:
        self.block_pass = block_pass
        self.masks: list[Tensor] = []
        self.decided: list[Tensor] = []

    def before_block(self, i: int, x: Packed) -> Tensor | None:
        return None

    def records(self, i: int) -> bool:
        return False

    def after_attention(self, i: int, y: Tensor, record: AttentionRecord, before: Tensor) -> Tensor | None:
        """``y [T, C]``: the map with the processed rows after the attention half (writable);
        ``before [Ta, C]``: those rows' values before block ``i``. -> ``[T]`` bool rows the MLP
        half processes."""
        return None

    def has_mid_selection(self, i: int) -> bool:
        return False

    def selects_queries(self, i: int) -> bool:
        """Whether block ``i`` computes attention (and the MLP) only for the rows ``select_queries``
        picks from its ``qkv`` (ATS); the other rows are dropped without being computed."""
        return False

    def select_queries(self, i: int, record: AttentionRecord) -> Tensor:
        """``[T]`` bool over the map's rows: the rows whose attention output and MLP block ``i`` computes."""
        raise NotImplementedError

    def key_bias(self, i: int) -> Tensor | None:
        """``[T]`` additive bias of each row as a key in block ``i``'s attention (ToMe: log size)."""
        return None

    def attention_probs(self, i: int) -> Tensor | None:
        """``[B, H, L, L]`` attention probabilities block ``i`` uses instead of its own softmax (MCTF's
        one-step-ahead attention), image ``b``'s active rows in map order; None: its own."""
        return None

    def after_block(self, i: int, record: AttentionRecord | None) -> None:
        return None

    def readout_mask(self) -> Tensor | None:
        """``[T]`` bool rows active at the end (None: all)."""
        return None

    def spread(self, values: Tensor) -> Tensor:
        """``[T, C]`` each row given the value of the row that holds its token now (merging methods; the
        others: as is), for a spatial layer that reads the whole grid (the detector's adapter)."""
        return values

    def gather_back(self, values: Tensor) -> Tensor:
        """``[T, C]`` after such a layer wrote every row of ``spread``'s map: the rows that hold merged
        tokens take them back (merging methods; the others: as is)."""
        return values

    def host_counts(self, mask: Tensor) -> list[int] | None:
        """The rows of each image ``mask`` (one this run returned) selects, when the method knows them
        on the host without reading the device (fixed counts); None: they are read once."""
        return None

    def record_counts(self, mask: Tensor, lengths: list[int]) -> None:
        """Told the counts that were read for ``mask``, so they are not read again."""

    def expected_rows(self, i: int) -> float | None:
        """Rows of the whole batch block ``i`` is expected to process, for the capacity forward's
        fixed row count (``TokenStack.set_execution(capacity=F)``); None: every row."""
        return None


@dataclass(frozen=True)
class NoOptions:
    """A method without options of its own."""


def no_selectors(config: ViTConfig, options: Any) -> list[nn.Module]:
    return []


def no_selector_flops(config: ViTConfig, options: Any, kept: Tensor, total: Tensor) -> Tensor:
    return torch.zeros_like(total, dtype=torch.float64)


def no_virtual_rows(config: ViTConfig, options: Any) -> int:
    return 0


def cls_readout(options: Any) -> str:
    return "cls"


@dataclass(frozen=True)
class Method:
    """What the library asks of a pruning method. ``run``: its per-forward ``MethodRun`` class;
    ``options``: its options dataclass (the ``Pruning.options`` it accepts); ``make_selectors(config,
    options)``: its modules with parameters (``gates.{k}``); ``needs_class_token``: it selects with the
    class token (detector backbones then get an artificial one); ``train_execution``: the execution it
    trains in (None: training is refused with ``train_refusal``); ``calibrate(stack, images, targets)``:
    shifts its thresholds to keep targets (None: it keeps its own counts); ``ratio_loss(usage, targets,
    kind)``: its keep-ratio loss term (None: none); ``count_follows_attention``: its keep count follows
    trained attention (random weights keep nearly everything); ``counts_on_device``: its keep counts depend
    on the data (one device read per selection in the exact forward); ``capacity``: the capacity forward
    can run its selections without those reads (``MethodRun.expected_rows`` sizes them; ``observe(stack,
    usage)`` keeps the estimate they follow); ``query_subset``: it computes attention
    and MLP only for the query rows it keeps (FLOPs); ``selector_flops(config, options, kept [B, depth],
    total [B])``: FLOPs of its selection; ``virtual_rows(config, options)``: extra rows per image it
    writes; ``readout(options)``: what the classifier head reads (``cls`` or ``mean``); ``validate(config,
    options)``: its own checks; ``legacy_names``: old flat option names of its fields."""

    name: str
    title: str
    run: type[MethodRun]
    options: type = NoOptions
    make_selectors: Callable[[ViTConfig, Any], list[nn.Module]] = no_selectors
    needs_class_token: bool = True
    train_execution: str | None = "packed"
    train_refusal: str = ""
    calibrate: Callable | None = None
    ratio_loss: Callable | None = None
    count_follows_attention: bool = False
    counts_on_device: bool = False  # its keep counts depend on the data and are read from the device
    capacity: bool = False  # the capacity forward runs its ``before_block`` selections with no read (SViT)
    observe: Callable | None = None  # (stack, usage) after a capacity forward: what its selections kept (SViT)
    query_subset: bool = False
    selector_flops: Callable[[ViTConfig, Any, Tensor, Tensor], Tensor] = no_selector_flops
    virtual_rows: Callable[[ViTConfig, Any], int] = no_virtual_rows
    readout: Callable[[Any], str] = cls_readout
    validate: Callable[[ViTConfig, Any], None] | None = None
    legacy_names: dict[str, str] = field(default_factory=dict)  # old flat option name -> options field

    def resolve_options(self, config: ViTConfig) -> Any:
        """``config.pruning.options`` as this method's options dataclass: its own fields taken, an old
        flat option of another method accepted only at its old default; then the method's checks."""
        given = {self.legacy_names.get(k, k): v for k, v in config.pruning.options.items()}
        own = {f.name for f in dataclasses.fields(self.options)}
        foreign = {k: v for k, v in given.items() if k not in own}
        bad = sorted(k for k, v in foreign.items()
                     if k not in LEGACY_OPTION_DEFAULTS or v != LEGACY_OPTION_DEFAULTS[k])
        if bad:
            known = ", ".join(sorted(own)) or "none"
            raise ValueError(f"{', '.join(bad)}: not an option of {self.title} (its options: {known})")
        options = self.options(**{k: v for k, v in given.items() if k in own})
        if self.needs_class_token and not config.class_token:
            raise ValueError(f"{self.title} selects with the class token's attention: it needs class_token=True")
        if self.validate is not None:
            self.validate(config, options)
        return options
