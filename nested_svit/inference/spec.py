"""What a run builds, in plain values: ``ModelSpec`` (family, name, checkpoint, precision, backend, ...).
The command line fills one per run; the local run, every torchrun rank and every Ray actor build the
model from it (``build``), so the model is the same everywhere by construction. ``family_of`` is the one
place that tells a classifier from a detector."""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..attention import resolve_backend
from ..checkpoint import LoadReport, load_checkpoint
from ..checkpoint.factory import DEFAULT_CLASSIFIER, classifier_for
from ..detection.checkpoint import checkpoint_classes, checkpoint_kind, detector_from_file
from ..detection.detector import MaskRCNNDetector
from ..detection.registry import create_detector, is_detector
from ..devices import dtype_of, native_bf16
from ..precision import set_precision

FAMILIES = ("classifier", "detector")
# what --compile's speed is, as measured (bench/README.md), said with every compiled run
COMPILE_MEASURED = "measured 0.96-0.98x eager on a 2-core CPU (bench/README.md), not yet timed on a GPU"
BF16_MEASURED = ("--precision bf16 ran SViT-S 1.4-1.5x faster than fp32 on a 2-core AVX512-BF16 CPU (int8: "
                 "1.5-1.8x), every decision still made in fp32 (bench/README.md); --agreement-with fp32 reports "
                 "what changes")
COMPILE_NOTE = ("note: --compile: the first batches compile the blocks' dense math (about 30 s on 2 CPU cores; "
                f"inductor caches it for the next run); {COMPILE_MEASURED}")
DEFAULT_MODEL = {"classifier": DEFAULT_CLASSIFIER, "detector": "svit_adapter_small_maskrcnn"}


def family_of(name: str | None, checkpoint: str | os.PathLike | None) -> str:
    """``detector`` for a detector name, or no name and a checkpoint that holds a detector of ours;
    else ``classifier``. The one family switch: everything else asks the spec."""
    if is_detector(name) or (name is None and detector_from_file(checkpoint) is not None):
        return "detector"
    return "classifier"


@dataclass
class BuiltModel:
    """A built model with its weights: the load report (None: random weights) and what a user should
    read about it (``messages``: whole lines, ``note:`` / ``warning:``)."""

    model: nn.Module
    report: LoadReport | None
    messages: list[str] = field(default_factory=list)
    reference: nn.Module | None = None  # ``agreement_with``: the same weights in the reference precision
    backend: str = "auto"  # the attention backend the run uses, resolved once for the whole run

    @property
    def name(self) -> str:
        return self.model.name


@dataclass(frozen=True)
class ModelSpec:
    """A model to build. ``name``: a registry name, or None for what the checkpoint carries (else the
    family's default); ``random_weights``: allow no checkpoint (initialised from ``seed``, so every
    process builds the same). Classifiers: ``num_classes``, ``img_size`` override the config; detectors:
    ``img_scale``, and ``categories`` (an annotation file's class names: predicted unless the checkpoint
    predicts another number of classes); ``compile``: the blocks' dense math as compiled regions;
    ``capacity``, ``cuda_graphs``: the capacity forward and CUDA graphs (classifiers)."""

    family: str
    name: str | None = None
    checkpoint: str | None = None
    random_weights: bool = False
    seed: int = 0
    precision: str = "fp32"
    backend: str = "auto"
    num_classes: int | None = None
    img_size: int | None = None
    img_scale: tuple[int, int] | None = None
    categories: tuple[str, ...] | None = None
    compile: bool = False  # the blocks' dense math as compiled regions (``TokenStack.set_execution``)
    capacity: float | None = None  # the capacity forward's factor (``TokenStack.set_execution``); None: exact
    cuda_graphs: bool = False  # classifiers on CUDA: a CUDA graph per batch shape (``inference.graphs``)
    agreement_with: str | None = None  # classifiers: a reference precision (fp32) whose decisions each batch reports

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, not {self.family!r}")
        dtype_of(self.precision)  # a bad precision fails here, in one line

    def build(self, device: torch.device | str = "cpu") -> BuiltModel:
        """The model with its weights (read and checked before any image), on ``device`` in the spec's
        precision, in eval mode and the packed execution with the spec's attention backend."""
        if self.capacity is not None and not (isinstance(self.capacity, (int, float)) and 0 < self.capacity < math.inf):
            raise ValueError(f"--capacity must be a finite factor > 0 (1.25: 25% above the expected rows), got "
                             f"{self.capacity!r}; leave it out for the exact forward")
        if self.family == "detector" and (self.capacity or self.cuda_graphs):
            raise ValueError("--capacity and --cuda-graphs run classifiers only; a detector runs the exact forward")
        if self.agreement_with is not None:
            dtype_of(self.agreement_with)
            if self.family == "detector":
                raise ValueError("--agreement-with reports a classifier's decisions; a detector has no top-1")
            if self.cuda_graphs:
                raise ValueError("--agreement-with compares each image's kept tokens, which a CUDA graph's replay does "
                                 "not keep: leave --cuda-graphs out for that run")
            if self.agreement_with == self.precision:
                raise ValueError(f"--agreement-with {self.agreement_with} compares a reduced precision with it: give "
                                 f"--precision bf16 (or fp16 on CUDA)")
        torch.manual_seed(self.seed)  # random weights (and unloaded selectors) are the same in every process
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"--capacity {self.capacity}: below 1 a batch's capacity is smaller than what the gates "
                             "keep on average, so most batches would run twice; give F >= 1 (1.25: 25% above what "
                             "they keep)")
        built = _build_detector(self) if self.family == "detector" else _build_classifier(self)
        if self.capacity is not None:
            _check_capacity_helps(built.model, built.name)
        if built.report is None and not self.random_weights:
            raise ValueError("--checkpoint is required (or pass --random-weights to run an untrained model)")
        built.messages += _random_gates_warning(built.model, built.report)
        if self.agreement_with is not None:  # the same weights, before any rounding, in the reference precision
            built.reference = set_precision(copy.deepcopy(built.model).to(device), self.agreement_with)
            built.reference.eval().set_execution("packed", self.backend)
        set_precision(built.model.to(device), self.precision)  # reduced precision: decisions stay fp32
        built.model.eval().set_execution("packed", self.backend, compile=self.compile, capacity=self.capacity or 0)
        built.backend = resolve_backend(self.backend, device, dtype_of(self.precision))
        if self.cuda_graphs:
            from .graphs import graphs_refusal

            refusal = graphs_refusal(built.model, device)
            if refusal:
                raise ValueError(refusal)
        if self.compile:
            built.messages.append(_compile_now(built.model, device) if self.family == "classifier" else COMPILE_NOTE)
        return built


def bf16_note(spec: ModelSpec, device: torch.device | str) -> list[str]:
    """The line a command shows once when a classifier runs in fp32 on a CPU that computes bf16 natively."""
    if spec.family == "classifier" and spec.precision == "fp32" and torch.device(device).type == "cpu" \
            and native_bf16(device):
        return [f"note: this CPU computes bf16 natively: {BF16_MEASURED}"]
    return []


def _check_capacity_helps(model: nn.Module, name: str) -> None:
    """``--capacity`` sizes keep counts that depend on the data; a model without them is refused in one line."""
    if not model.prunes:
        raise ValueError(f"--capacity sizes the keep counts of a pruned model; {name} keeps every token, so there is "
                         "nothing to size (leave --capacity out)")
    method = model.method
    if not method.counts_on_device:
        raise ValueError(f"--capacity sizes keep counts that depend on the data; {method.title} keeps counts fixed by "
                         "its config, which its exact forward knows without reading anything (leave --capacity out; "
                         "--cuda-graphs captures it as it is)")


def _compile_now(model: nn.Module, device: torch.device | str) -> str:
    """Compile a classifier's block regions before any image is read (one forward of two blank images:
    the row count is dynamic, so every later batch reuses the graphs) -> the line that says how long."""
    import logging
    import time

    if torch.device(device).type == "cpu":  # inductor's "No CUDA runtime is found, using CUDA_HOME" is no news here
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    size = model.config.img_size
    start = time.perf_counter()
    with torch.no_grad():
        model(torch.zeros(2, 3, size, size, device=device, dtype=model.dtype))
    return (f"note: --compile: the blocks' regions compiled in {time.perf_counter() - start:.1f} s (inductor caches "
            f"them: the next run's is faster); {COMPILE_MEASURED}")


def _build_classifier(spec: ModelSpec) -> BuiltModel:
    """The model the checkpoint describes (``checkpoint.classifier_for``), the spec's name and fields over it."""
    model, report, messages = classifier_for(spec.checkpoint, spec.name, img_size=spec.img_size,
                                             num_classes=spec.num_classes)
    return BuiltModel(model, report, messages)


def _build_detector(spec: ModelSpec) -> BuiltModel:
    """A file without detector heads (a classification checkpoint) is refused: the adapter, FPN, RPN and
    RoI heads would be random."""
    if spec.checkpoint and checkpoint_kind(spec.checkpoint) == "imagenet":
        name = spec.name or "the detector"
        raise ValueError(f"{spec.checkpoint} is a classification checkpoint: it holds a ViT backbone only, so "
                         f"{name}'s adapter, FPN, RPN and RoI heads would be random. Give a detector checkpoint "
                         "(official SViT / ViT-Adapter mmdet file, or one 'nested-svit train' wrote), or train one "
                         f"from this file: nested-svit train --model {spec.name or DEFAULT_MODEL['detector']} "
                         f"--init {spec.checkpoint} ...")
    carried = detector_from_file(spec.checkpoint)
    classes = checkpoint_classes(spec.checkpoint)
    overrides: dict = {}
    if spec.img_scale:
        overrides["img_scale"] = tuple(spec.img_scale)
    if spec.categories is not None and classes in (None, len(spec.categories)):
        overrides["num_classes"], overrides["class_names"] = len(spec.categories), tuple(spec.categories)
    elif classes is not None and carried is None:
        overrides["num_classes"] = classes
    if carried is not None:
        name, cfg = carried
        model = MaskRCNNDetector(dataclasses.replace(cfg, **overrides))
        model.name = name or spec.name
    else:
        model = create_detector(spec.name or DEFAULT_MODEL["detector"], **overrides)
    report = load_checkpoint(model, spec.checkpoint) if spec.checkpoint else None
    return BuiltModel(model, report, [])


def _random_gates_warning(model: nn.Module, report: LoadReport | None) -> list[str]:
    """A pruned model whose checkpoint had no selector weights prunes at random: say so, and how to fix
    it (also in the report's notes, which the outputs record)."""
    stack = model.backbone if hasattr(model, "backbone") else model
    if report is None or not stack.num_gates:
        return []
    if report.format != "imagenet" and not any("gates keep their initialisation" in n for n in report.notes):
        return []
    method = stack.method
    fix = "fine-tune with 'nested-svit train'" if method.train_execution else "use its authors' release weights"
    text = (f"warning: the checkpoint has no {method.title} selector weights, so the gates of this {method.title} "
            f"model are random: pruning is arbitrary. Use a {method.title} checkpoint, {fix}, or run the dense model")
    report.notes.append(text)
    return [text]


def load_model(checkpoint: str | os.PathLike, name: str | None = None, device: torch.device | str = "cpu",
               **settings) -> nn.Module:
    """The classifier a checkpoint file describes, with its weights, in eval mode: a ``train`` file's
    architecture, classes and class names; a release's configuration (its training args); for a plain
    state dict, the registered model of its shape (``checkpoint.models_like``; ``name`` chooses).
    ``settings``: other ``ModelSpec`` fields (precision, backend, img_size, ...). Notes and warnings
    (random gates, a release's configuration) are Python warnings. ``checkpoint``: a file, a folder
    (``config.json`` + weights), ``local-dir:PATH`` or ``hf-hub:ORG/NAME[@REV]`` (the local cache)."""
    return _loaded(ModelSpec("classifier", name, str(checkpoint), **settings), device)


def load_detector(checkpoint: str | os.PathLike, name: str | None = None, device: torch.device | str = "cpu",
                  **settings) -> nn.Module:
    """The detector a checkpoint file describes (ours: the config with its classes, class names and test
    scale; an official mmdet file: ``name`` or SViT-Adapter-S, classes from its box head), with its
    weights, in eval mode. ``settings``: other ``ModelSpec`` fields (precision, img_scale, ...)."""
    return _loaded(ModelSpec("detector", name, str(checkpoint), **settings), device)


def _loaded(spec: ModelSpec, device) -> nn.Module:
    import warnings

    built = spec.build(device)
    for line in built.messages:
        warnings.warn(line.split(": ", 1)[-1] if line.startswith(("note: ", "warning: ")) else line, stacklevel=3)
    return built.model
