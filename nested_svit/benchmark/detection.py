"""Detector throughput: FPS^w (whole network) and FPS^b (backbone) of dense vs gated ViT-Adapter
Mask R-CNN over batch sizes, on mixed-resolution batches, against the FLOP ideal.

Method: one pool of images of different shapes (COCO-like); every batch size processes the whole pool
in batches of that size (batch 1: one image per call), so per-image times compare across batch sizes.
Runners (model x {whole, backbone}) are timed in interleaved rounds; medians are reported. Gates of
random-weight models are calibrated to their keep targets on the pool. Random heads score every class
near 1/81, below mmdet's 0.05 threshold, so the RoI test threshold is set to 0 here: every image then
gets the full 100 detections and masks (the heads' worst case, the same for both models).
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import pandas as pd
import torch

from ..config import Pruning
from ..data.decode import decode_rgb_array
from ..data.records import resolve_records
from ..detection.detector import MaskRCNNDetector
from ..devices import kernel_settings, set_kernel_settings, synchronize
from ..detection.registry import create_detector, dense_detector
from ..registry import SVIT_GATE_BLOCKS, SVIT_KEEP_TARGETS
from ..version import __version__, source_commit
from .flop_count import count_flops
from .flops import flops_per_image
from .memory import peak_memory_mb
from .stand_ins import stand_in_selectors
from .timing import BenchProgress

# resized COCO-like shapes (h, w) at img_scale 1333x800: landscape, portrait, 4:3, wide
COCO_LIKE_SHAPES = [(800, 1333), (1199, 800), (800, 1066), (750, 1333)]
COLUMNS = ["model", "part", "device", "batch_size", "img_scale", "pool", "images_per_sec", "time_per_image_ms",
           "time_per_image_p10_ms", "time_per_image_p90_ms", "gmacs_per_image", "ideal_speedup", "speedup",
           "efficiency", "mean_keep_ratio", "peak_mem_mb", "detections_per_image", "threads", "rounds", "torch_version",
           "kernel_settings", "version", "source_commit"]


@dataclass
class DetBenchConfig:
    models: list[str] = field(default_factory=lambda: ["vit_adapter_small_maskrcnn", "svit_adapter_small_maskrcnn"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4])
    img_scale: tuple[int, int] = (1333, 800)
    shapes: list[tuple[int, int]] = field(default_factory=lambda: list(COCO_LIKE_SHAPES))
    device: str = "cpu"
    threads: int | None = None
    rounds: int = 3
    warmup: int = 1
    calibrate: bool = True
    seed: int = 0
    input: str = "synthetic"  # or a directory of images (the first len(shapes) are used, at their own sizes)
    detections: int = 100  # per image, with masks: the heads' worst case (fewer for a quick check)


def _pool(cfg: DetBenchConfig) -> list[np.ndarray]:
    if cfg.input != "synthetic":
        records = resolve_records(cfg.input)
        return [decode_rgb_array(src, exif=True) for src in records.sources[:len(cfg.shapes)]]
    rng = np.random.default_rng(cfg.seed)
    pool = []
    for h, w in cfg.shapes:  # smooth random structure (blobs), not white noise
        low = rng.integers(0, 255, (max(h // 32, 2), max(w // 32, 2), 3), dtype=np.uint8)
        import cv2

        pool.append(cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC))
    return pool


def _build(name: str, cfg: DetBenchConfig, pool: list[np.ndarray], device: torch.device) -> MaskRCNNDetector:
    torch.manual_seed(cfg.seed)
    model = create_detector(name, img_scale=cfg.img_scale).eval()
    model.config = replace(model.config, rcnn=replace(model.config.rcnn, score_thr=0.0, max_per_img=cfg.detections))
    if cfg.calibrate:  # random class attention is near uniform: ATS is sharpened to SViT's pruning rate
        inputs, _ = model.preprocess(pool)
        stand_in_selectors(model.backbone, inputs, _svit_block_flop_ratio(model))
    return model.to(device)


def _svit_block_flop_ratio(model: MaskRCNNDetector) -> float:
    """FLOPs of the ViT blocks at SViT's keep targets over dense, at 1333x800's token count."""
    vit = model.config.vit
    n = (800 // vit.patch_size) * (1333 // vit.patch_size)
    keep = [1.0] * vit.depth
    for b, t in zip(SVIT_GATE_BLOCKS, SVIT_KEEP_TARGETS):
        keep[b] = t
    dense = torch.full((1, vit.depth), n, dtype=torch.int64)
    sparse = (dense * torch.tensor(keep)).round().long()
    cfg = replace(vit, pruning=Pruning())
    total = torch.tensor([n])
    return float(flops_per_image(cfg, sparse, total) / flops_per_image(cfg, dense, total))


def run_detection_benchmark(cfg: DetBenchConfig, progress: Callable[[BenchProgress], None] | None = None
                            ) -> pd.DataFrame:
    """One row per (model, part, batch size); ``progress``: called before each timed call with a
    ``BenchProgress`` (its ``runner``: model and part)."""
    if any(b < 1 for b in cfg.batch_sizes) or cfg.rounds < 1:
        raise ValueError("batch sizes and rounds must be positive")
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    report = progress or (lambda event: None)
    set_kernel_settings(False)
    settings = json.dumps(kernel_settings())
    pool = _pool(cfg)
    names = list(dict.fromkeys([dense_detector(n) for n in cfg.models] + list(cfg.models)))
    models = {n: _build(n, cfg, pool, device) for n in names}
    inputs, metas = models[names[0]].preprocess(pool)
    inputs = [t.to(device) for t in inputs]

    def call(model: MaskRCNNDetector, part: str, bs: int) -> list:
        out = []
        for s in range(0, len(inputs), bs):
            out += model.predict_preprocessed(inputs[s:s + bs], metas[s:s + bs], "bool", backbone_only=part == "backbone")
        return out

    stats = {}
    with torch.no_grad():  # not inference_mode: jagged tensors cannot be built from inference tensors
        for n, m in models.items():  # FLOPs, usage, detections: once per model (batch-invariant)
            whole = count_flops(lambda: call(m, "whole", len(inputs)))
            backbone = count_flops(lambda: call(m, "backbone", len(inputs)))
            dets = call(m, "whole", len(inputs))
            keep = float(np.mean([(d.kept[list(m.config.vit.gate_blocks)].float() / d.total).mean() for d in dets])) \
                if m.backbone.prunes else 1.0
            # multiply-adds (the paper's unit): count_flops counts 2 FLOPs per multiply-add
            stats[n] = {"whole": whole / len(inputs) / 2e9, "backbone": backbone / len(inputs) / 2e9, "keep": keep,
                        "dets": float(np.mean([len(d.scores) for d in dets]))}
        rows = []
        runners = [(n, part) for n in names for part in ("whole", "backbone")]
        steps = len(cfg.batch_sizes) * cfg.rounds * len(runners)
        for b, bs in enumerate(cfg.batch_sizes):
            times: dict = {r: [] for r in runners}
            for r in runners:
                for _ in range(cfg.warmup):
                    call(models[r[0]], r[1], bs)
            for i in range(cfg.rounds):
                for k, r in enumerate(runners):
                    report(BenchProgress(bs, i + 1, cfg.rounds, (b * cfg.rounds + i) * len(runners) + k, steps,
                                         f"{r[0]} {r[1]}"))
                    t0 = time.perf_counter()
                    call(models[r[0]], r[1], bs)
                    synchronize(device)
                    times[r].append((time.perf_counter() - t0) / len(inputs))
            for n, part in runners:
                per_image = statistics.median(times[(n, part)])
                dense = dense_detector(n)
                dense_time = statistics.median(times[(dense, part)])
                speedup = dense_time / per_image
                ideal = stats[dense][part] / stats[n][part]
                rows.append({
                    "model": n, "part": part, "device": str(device), "batch_size": bs,
                    "img_scale": "x".join(map(str, cfg.img_scale)),
                    "pool": ";".join(f"{t.shape[-1]}x{t.shape[-2]}" for t in inputs),
                    "images_per_sec": 1 / per_image, "time_per_image_ms": per_image * 1000,
                    "time_per_image_p10_ms": float(np.percentile(times[(n, part)], 10)) * 1000,
                    "time_per_image_p90_ms": float(np.percentile(times[(n, part)], 90)) * 1000,
                    "gmacs_per_image": stats[n][part], "ideal_speedup": ideal, "speedup": speedup,
                    "efficiency": speedup / ideal, "mean_keep_ratio": stats[n]["keep"],
                    "peak_mem_mb": peak_memory_mb(lambda: call(models[n], part, bs), device),
                    "detections_per_image": stats[n]["dets"], "threads": torch.get_num_threads(), "rounds": cfg.rounds,
                    "torch_version": torch.__version__, "kernel_settings": settings, "version": __version__,
                    "source_commit": source_commit(),
                })
    return pd.DataFrame(rows, columns=COLUMNS)
