"""CUDA graphs of a classifier's forward (``--cuda-graphs``): one graph per input shape, each call one
replay and one host read.

What a graph captures is ``SparseViT.forward_device``: the capacity forward for SViT's gates, the plain
packed forward for dense models and the fixed-count baselines. Neither reads the device nor copies host
data, and every offset, count and index is computed on the device from the images, so a replay on other
images cannot use a stale one (tests/test_capacity.py traces one batch and replays it on another). A
batch whose capacity was too small is rerun with room for every row and counted (``model.capacity_reruns``).
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import Tensor

from ..devices import capture_graph, graph_pool, is_real_cuda
from ..model import SparseViT, TokenUsage

Capture = Callable[..., Callable[[Tensor], tuple[Tensor, ...]]]


def graphs_refusal(model: SparseViT, device: torch.device | str) -> str | None:
    """Why ``model`` on ``device`` cannot run under CUDA graphs (None: it can)."""
    if not is_real_cuda(device):
        return f"--cuda-graphs needs a CUDA device, not {torch.device(device)}"
    if model.method.counts_on_device and not model.method.capacity:
        return f"--cuda-graphs: {model.method.title} reads its counts inside the block; it cannot be captured"
    return None


class GraphedClassifier:
    """``model``'s forward as CUDA graphs, captured on first sight of each input shape (batch, channels,
    height, width, dtype), at most ``max_graphs`` (later shapes run eagerly). SViT models need the
    capacity forward (``set_execution(capacity=F)``); it is set to ``default_capacity`` when not.
    ``capture(fn, example, pool=...)``: how a graph is captured (``devices.capture_graph``)."""

    def __init__(self, model: SparseViT, max_graphs: int = 8, default_capacity: float = 1.25,
                 capture: Capture | None = None):
        self.model = model
        self.max_graphs = max_graphs
        self.capture = capture or capture_graph
        if model.method.counts_on_device and model.capacity is None:
            model.set_execution("packed", capacity=default_capacity)
        self.graphs: dict[tuple, Callable[[Tensor], tuple[Tensor, ...]]] = {}
        self.pool = graph_pool(model.pos_embed.device)
        self.replays = 0
        self.eager_calls = 0

    def __call__(self, images: Tensor) -> tuple[Tensor, TokenUsage]:
        """``images [B, 3, H, W]`` on the model's device -> (logits ``[B, num_classes]``, usage on the host)."""
        key = (tuple(images.shape), images.dtype)
        replay = self.graphs.get(key)
        if replay is None and len(self.graphs) < self.max_graphs:
            replay = self.graphs[key] = self.capture(self.model.forward_device, images, pool=self.pool)
        if replay is None:
            self.eager_calls += 1
            feats, usage = self.model.forward_features(images, return_usage=True)
            return self.model.forward_head(feats), usage
        logits, kept, kept_mlp, overflow = replay(images)
        self.replays += 1
        n = kept.numel()
        flat = torch.cat([kept.flatten(), kept_mlp.flatten(), overflow.view(1).to(torch.int64)]).cpu()  # one read
        if flat[-1]:  # a capacity was too small for these images: rerun them with room for every row
            with self.model.uncapped_forward():
                feats, usage = self.model.forward_features(images, return_usage=True)
            self.model.capacity_reruns += 1
            return self.model.forward_head(feats), usage
        gh, gw = self.model.patch_embed.grid(images.shape[-2], images.shape[-1])
        tokens = torch.full((images.shape[0],), gh * gw + int(self.model.cls_token is not None), dtype=torch.int64)
        usage = TokenUsage(flat[:n].view(kept.shape), tokens, self.model.config.gate_blocks,
                           kept_mlp=flat[n:2 * n].view(kept.shape))
        if self.model.method.observe is not None:  # graphs captured later are sized by what the gates keep
            self.model.method.observe(self.model, usage)
        return logits.clone(), usage


_GRAPHED: "weakref.WeakKeyDictionary[SparseViT, GraphedClassifier]" = weakref.WeakKeyDictionary()


def graphed(model: SparseViT) -> GraphedClassifier:
    """The one ``GraphedClassifier`` of ``model`` (its graphs kept for the model's life)."""
    if model not in _GRAPHED:
        _GRAPHED[model] = GraphedClassifier(model)
    return _GRAPHED[model]
