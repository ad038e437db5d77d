"""Batch-size sweep: time dense and pruned models side by side and relate speed-ups to FLOPs.

Method: one image pool per run; per batch size every runner (model x backend) is warmed up, then
timed in interleaved rounds (A B C A B C ...) so machine drift hits all alike; medians of the
rounds are reported. Random-weight selectors get their stand-ins (``stand_ins.py``): gates are
calibrated to their keep targets on the pool, a method whose count follows the class attention (ATS)
gets its random queries sharpened until its FLOPs are the paper's; the others keep fixed counts.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..attention import resolve_backend
from ..devices import (PRECISIONS, cuda_available, dtype_of, is_real_cuda, kernel_settings, seconds_of,
                       set_kernel_settings)
from ..inference.agreement import Agreement, agreement, alone, decisions_of
from ..methods.svit import keep_budget
from ..model import SparseViT
from ..registry import build_model, dense_counterpart, get_config
from ..precision import set_precision
from ..version import __version__, source_commit
from .flops import flops_per_image
from .memory import peak_memory_mb
from .peers import precisions_here
from .peers import peer_runner, split_name
from .stand_ins import stand_in_selectors
from .timing import BenchProgress

__all__ = ["BenchConfig", "run_benchmark", "PRECISIONS", "TIMM_PREFIX", "COLUMNS"]
TIMM_PREFIX = "timm/"
COLUMNS = ["model", "runtime", "backend", "device", "precision", "batch_size", "img_size", "param_count",
           "infer_samples_per_sec", "infer_step_time", "infer_step_time_p10", "infer_step_time_p90",
           "mean_kept_tokens", "gmacs_per_image", "ideal_speedup", "speedup", "efficiency", "fastest_dense",
           "speedup_vs_fastest_dense", "efficiency_vs_fastest_dense", "agree_fp32_kept", "agree_fp32_top1",
           "alone_kept", "alone_top1", "alone_images_equal", "alone_max_logit_diff", "peak_mem_mb",
           "calibrated_gates", "threads", "rounds", "torch_version", "kernel_settings", "version", "source_commit",
           "checkpoint", "compiled"]


@dataclass
class BenchConfig:
    """``models``: our registry names, ``timm/<name>``, ``openvino/<name>`` / ``onnxruntime/<name>`` (our dense
    model ``<name>``'s weights exported to that runtime, ``benchmark/peers.py``); ``precision``: one or a
    comma list (``fp32,bf16``): every runner in each precision it has, side by side; ``agreement``: after
    the timing, each runner's decisions against the same weights in fp32 and each image's against itself
    alone (``inference/agreement.py``)."""

    models: list[str] = field(default_factory=lambda: ["deit_small_patch16_224", "svit_small"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    device: str = "cpu"
    threads: int | None = None
    precision: str = "fp32"
    backends: list[str] = field(default_factory=lambda: ["auto"])
    input: str = "synthetic"  # or a directory of images
    img_size: int | None = None  # default: the first model's input size
    rounds: int = 10  # at least this many interleaved rounds ...
    min_time: float = 2.0  # ... and enough that each runner is timed for >= min_time seconds (small batches)
    warmup: int = 2
    calibrate: bool = True
    tf32: bool = False  # TF32 matmuls / convolutions on CUDA (recorded in ``kernel_settings``)
    keep_targets: tuple[float, ...] | None = None  # calibrate gates to these (default: the model's own) ...
    keep_scale: float | None = None  # ... or to the model's own times this factor (clipped to [0, 1])
    seed: int = 0
    checkpoint: str | None = None  # measure the (trained) model this file describes, beside its dense counterpart
    compile: bool = False  # also time every runner compiled: timm's whole model, ours its blocks' dense math
    agreement: bool = True  # decisions against fp32 and against each image alone, after the timing

    @property
    def precisions(self) -> list[str]:
        values = [p.strip() for p in self.precision.split(",") if p.strip()]
        for p in values:
            dtype_of(p)  # one line for a bad name
        if not values:
            raise ValueError("give at least one precision")
        return list(dict.fromkeys(values))


@dataclass
class _Runner:
    model_name: str
    backend: str  # label in the output
    module: nn.Module
    base_name: str  # our registry name (timm models and peers: the matching dense config)
    calibrated: list  # gate indices calibrated, or what was calibrated (ATS)
    overrides: dict = field(default_factory=dict)  # config overrides of the dense model it is compared with
    attention: str | None = None  # backend to set on a shared SparseViT before each call
    checkpoint: str | None = None  # the file its weights come from (None: random weights)
    compiled: bool = False  # torch.compile'd (timm: the whole model; ours: the blocks' regions)
    precision: str = "fp32"
    runtime: str = "nested_svit"  # or timm, openvino, onnxruntime
    fp32: nn.Module | None = None  # the same weights in fp32 (decision agreement); None: this runner is fp32
    times: list[float] = field(default_factory=list)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.attention is not None:
            self.module.backend = self.attention
        return self.module(images)

    @property
    def dense(self) -> bool:
        return not isinstance(self.module, SparseViT) or not self.module.prunes

    @property
    def input_dtype(self) -> torch.dtype:
        """Ours: the model's input dtype (fp32 under ``set_precision``); timm's: the precision's."""
        if self.runtime in ("openvino", "onnxruntime"):
            return torch.float32  # they take fp32 arrays whatever they compute in
        return self.module.dtype if isinstance(self.module, SparseViT) else dtype_of(self.precision)

    @property
    def label(self) -> str:
        return f"{self.runtime}:{self.model_name}:{self.precision}" + (":compiled" if self.compiled else "")


def _timm_model(name: str, img_size: int | None = None) -> nn.Module:
    """timm's model ``name`` (random weights) at ``img_size`` (None: its own)."""
    try:
        import timm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(f"{name} needs timm: pip install 'nested-svit[bench]'") from e
    return timm.create_model(name[len(TIMM_PREFIX):], pretrained=False, **({"img_size": img_size} if img_size else {}))


def _image_pool(cfg: BenchConfig, count: int) -> torch.Tensor:
    if cfg.input == "synthetic":
        gen = torch.Generator().manual_seed(cfg.seed)
        return torch.randn(count, 3, cfg.img_size, cfg.img_size, generator=gen)
    from ..data.dataset import load_images_from_dir

    return load_images_from_dir(cfg.input, count, cfg.img_size)


def _from_checkpoint(cfg: BenchConfig) -> tuple[list[str], dict, dict]:
    """``cfg.checkpoint``: the model it describes (trained gates, its classes and input size) -> (its name,
    {name: model}, the config overrides its dense counterpart gets)."""
    from ..inference import load_model

    model = load_model(cfg.checkpoint)
    try:
        dense_counterpart(model.name)
    except ValueError:
        raise ValueError(f"{cfg.checkpoint} holds a {model.name!r}, not a model of a registered family: bench measures "
                         "it against the dense model of its width") from None
    return [model.name], {model.name: model}, {"img_size": model.config.img_size,
                                               "num_classes": model.config.num_classes}


def _build_runners(cfg: BenchConfig, pool: torch.Tensor, device: torch.device,
                   from_file: tuple[list[str], dict, dict] | None = None) -> list[_Runner]:
    models, loaded, overrides = from_file or (cfg.models, {}, {})
    names = list(dict.fromkeys(models))
    for name in list(names):  # the dense model of each width is always measured: speedup needs it
        peer = split_name(name)
        if not name.startswith(TIMM_PREFIX):
            dense = dense_counterpart(peer[1] if peer else name)
            if dense not in names:
                names.insert(0, dense)
    calib_images = pool[:64]
    runners = []
    for name in names:
        torch.manual_seed(cfg.seed)
        peer = split_name(name)
        if peer:
            runners += _peer_runners(cfg, name, peer, device)
            continue
        if name.startswith(TIMM_PREFIX):
            base = _timm_model(name, cfg.img_size).eval().to(device)
            runners += [_Runner(name, "dense", _in_precision(base, p, timm=True), name[len(TIMM_PREFIX):], [],
                                precision=p, runtime="timm", fp32=None if p == "fp32" else base)
                        for p in cfg.precisions if p != "int8"]  # timm's model has no int8 path here
            continue
        model = loaded[name].eval() if name in loaded else build_model(name, **overrides).eval()
        if not model.prunes:
            model.to(device)
            runners += [_Runner(name, "dense", _in_precision(model, p), name, [], overrides, precision=p,
                                fp32=None if p == "fp32" else model) for p in cfg.precisions]
            continue
        calibrated: list = []
        if cfg.calibrate:
            images = calib_images if model.method.calibrate is not None else calib_images[:16]
            targets = None if cfg.keep_targets is None and cfg.keep_scale is None else \
                keep_budget(cfg.keep_targets, cfg.keep_scale, model.config.keep_targets)
            calibrated = stand_in_selectors(model, images, keep_targets=targets)
        model.to(device).set_execution("packed")
        for p in cfg.precisions:
            module = _in_precision(model, p)
            for backend in dict.fromkeys(cfg.backends):
                resolved = resolve_backend(backend, device, dtype_of(p))  # also rejects backends not available here
                label = backend if backend != "auto" else f"auto:{resolved}"
                runners.append(_Runner(name, label, module, name, calibrated, overrides, attention=backend,
                                       checkpoint=cfg.checkpoint if name in loaded else None, precision=p,
                                       fp32=None if p == "fp32" else model))
    return runners + (_compiled_twins(runners) if cfg.compile else [])


def _in_precision(model: nn.Module, precision: str, timm: bool = False) -> nn.Module:
    """``model`` itself in fp32, else a copy in ``precision`` (ours: decisions in fp32, ``set_precision``;
    timm's: cast whole, as its users do)."""
    import copy

    if precision == "fp32":
        return model
    twin = copy.deepcopy(model)
    return twin.to(dtype_of(precision)) if timm else set_precision(twin, precision)


def _peer_runners(cfg: BenchConfig, name: str, peer: tuple[str, str], device: torch.device) -> list[_Runner]:
    """``openvino/<dense>`` or ``onnxruntime/<dense>``: the runtime's runner in each of the run's precisions
    it has."""
    runtime, base = peer
    if dense_counterpart(base) != base:
        raise ValueError(f"{name}: {runtime} runs a dense model ({dense_counterpart(base)}), not {base}")
    model = build_model(base, img_size=cfg.img_size).eval()
    return [_Runner(name, "dense", peer_runner(runtime, model, cfg.img_size, p, cfg.threads, str(device)), base, [],
                    precision=p, runtime=runtime, fp32=model.to(device))
            for p in cfg.precisions if p in precisions_here(runtime, str(device))]


def _compiled_twins(runners: list[_Runner]) -> list[_Runner]:
    """Each torch runner compiled, beside it: timm's model by ``torch.compile`` as a whole (what its users
    run), ours by ``set_execution(compile=True)`` on a copy (the same weights and selectors)."""
    import copy

    twins, copies = [], {}
    for r in runners:
        if r.runtime not in ("nested_svit", "timm"):
            continue
        if isinstance(r.module, SparseViT):
            if id(r.module) not in copies:
                copies[id(r.module)] = copy.deepcopy(r.module).set_execution("packed", compile=True)
            module = copies[id(r.module)]
        else:
            module = torch.compile(r.module)
        twins.append(_Runner(r.model_name, r.backend, module, r.base_name, r.calibrated, r.overrides, r.attention,
                             r.checkpoint, compiled=True, precision=r.precision, runtime=r.runtime, fp32=r.fp32))
    return twins


def _time_once(module: Callable[[torch.Tensor], object], images: torch.Tensor, device: torch.device) -> float:
    return seconds_of(lambda: module(images), device)


def _usage_flops(runner: _Runner, images: torch.Tensor) -> tuple[float, float, float]:
    """(mean kept tokens per gated block per image, GMACs per image, dense-model GMACs per image),
    the dense model being the same width without gates, on the same images."""
    dense_cfg = get_config(dense_counterpart(runner.base_name), **runner.overrides)
    n = 1 + (images.shape[-2] // dense_cfg.patch_size) * (images.shape[-1] // dense_cfg.patch_size)
    total = torch.full((images.shape[0],), n, dtype=torch.int64)
    dense = float(flops_per_image(dense_cfg, total[:, None].expand(-1, dense_cfg.depth), total).mean()) / 2e9
    model = runner.module
    if not isinstance(model, SparseViT) or not model.prunes:
        return float(n), dense, dense
    _, usage = model.forward_features(images, return_usage=True)
    gated = list(model.config.gate_blocks)
    gmacs = float(flops_per_image(model.config, usage.kept, usage.total, usage.kept_mlp).mean()) / 2e9
    return float(usage.kept_after_selection[:, gated].double().mean()), gmacs, dense


def _agreements(r: _Runner, images: torch.Tensor) -> dict:
    """After the timing: ``r``'s decisions against the same weights in fp32 (reduced precisions) and each
    image's against itself alone (batches over 1): the agreement columns."""
    out: dict = {}
    own = decisions_of(r.module, images)
    if r.fp32 is not None:
        fp32 = agreement(own, decisions_of(r.fp32, images.float()))
        out.update(agree_fp32_kept=_kept(fp32, r), agree_fp32_top1=fp32.top1)
    if images.shape[0] > 1:
        batch = agreement(own, alone(r.module, images))
        out.update(alone_kept=_kept(batch, r), alone_top1=batch.top1, alone_images_equal=batch.images_equal / batch.images,
                   alone_max_logit_diff=batch.max_logit_diff)
    return out


def _kept(a: Agreement, r: _Runner) -> float:
    return float("nan") if r.dense else a.kept_tokens


def run_benchmark(cfg: BenchConfig, progress: Callable[[BenchProgress], None] | None = None) -> pd.DataFrame:
    """Run the sweep; one row per (model, runtime, precision, backend, batch size) with the columns of
    ``COLUMNS``. ``progress``: called before each timed round with a ``BenchProgress``."""
    cfg.precisions  # a bad precision fails here, before any model is built
    if cfg.rounds < 1 or any(b < 1 for b in cfg.batch_sizes):
        raise ValueError("rounds and batch sizes must be positive")
    device = torch.device(cfg.device)
    if is_real_cuda(device) and not cuda_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    report = progress or (lambda event: None)
    from_file = _from_checkpoint(cfg) if cfg.checkpoint else None
    if cfg.img_size is None:
        ours = [m for m in cfg.models if not m.startswith(TIMM_PREFIX)]
        first = (split_name(ours[0]) or (None, ours[0]))[1] if ours else None
        cfg.img_size = from_file[2]["img_size"] if from_file else get_config(first).img_size if first else 224
    set_kernel_settings(cfg.tf32)
    settings = json.dumps(kernel_settings())
    pool = _image_pool(cfg, max(cfg.batch_sizes))
    runners = _build_runners(cfg, pool, device, from_file)
    rows = []
    with torch.no_grad():  # not inference_mode: jagged tensors cannot be built from inference tensors
        for position, bs in enumerate(cfg.batch_sizes):
            inputs = {dtype: pool[:bs].to(device, dtype) for dtype in {r.input_dtype for r in runners}}
            fastest = float("inf")
            for r in runners:
                r.times = []
                for _ in range(cfg.warmup):
                    r(inputs[r.input_dtype])
                fastest = min(fastest, _time_once(r, inputs[r.input_dtype], device))
            rounds = min(max(cfg.rounds, math.ceil(cfg.min_time / max(fastest, 1e-6))), 500)
            for i in range(rounds):
                report(BenchProgress(bs, i + 1, rounds, position, len(cfg.batch_sizes)))
                for r in runners:
                    r.times.append(_time_once(r, inputs[r.input_dtype], device))
            dense_time = {(r.model_name, r.compiled, r.precision): statistics.median(r.times) for r in runners
                          if isinstance(r.module, SparseViT) and not r.module.prunes}
            fastest_dense = min((r for r in runners if r.dense), key=lambda r: statistics.median(r.times))
            fastest_time = statistics.median(fastest_dense.times)
            usage: dict[int, tuple[float, float, float]] = {}  # backends of one model share its usage
            for r in runners:
                images = inputs[r.input_dtype]
                step = statistics.median(r.times)
                if id(r.module) not in usage:
                    usage[id(r.module)] = _usage_flops(r, images)
                kept, gmacs, dense_gmacs = usage[id(r.module)]
                reference = dense_time.get((dense_counterpart(r.base_name), r.compiled, r.precision))
                speedup = reference / step if reference else float("nan")
                ideal = dense_gmacs / gmacs
                rows.append({
                    "model": r.model_name, "runtime": r.runtime, "backend": r.backend, "device": str(device),
                    "precision": r.precision, "batch_size": bs, "img_size": images.shape[-1],
                    "param_count": round(sum(p.numel() for p in (r.fp32 or r.module).parameters()) / 1e6, 2),
                    "infer_samples_per_sec": bs / step, "infer_step_time": step * 1000,
                    "infer_step_time_p10": float(np.percentile(r.times, 10)) * 1000,
                    "infer_step_time_p90": float(np.percentile(r.times, 90)) * 1000,
                    "mean_kept_tokens": kept, "gmacs_per_image": gmacs, "ideal_speedup": ideal,
                    "speedup": speedup, "efficiency": speedup / ideal, "fastest_dense": fastest_dense.label,
                    "speedup_vs_fastest_dense": fastest_time / step,
                    "efficiency_vs_fastest_dense": fastest_time / step / ideal,
                    **(_agreements(r, images) if cfg.agreement else {}),
                    "peak_mem_mb": peak_memory_mb(lambda: r(images), device),
                    "calibrated_gates": ",".join(map(str, r.calibrated)), "threads": torch.get_num_threads(),
                    "rounds": rounds, "torch_version": torch.__version__, "kernel_settings": settings,
                    "version": __version__, "source_commit": source_commit(),
                    "checkpoint": r.checkpoint, "compiled": r.compiled,
                })
    return pd.DataFrame(rows, columns=COLUMNS)
