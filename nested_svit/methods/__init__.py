"""Token-pruning methods on the one engine: SViT and the paper's baselines (see ``base.py``)."""
from __future__ import annotations

from torch import nn

from ..config import ViTConfig
from . import dynamicvit, svit
from .ats import ATSRun
from .base import AttentionRecord, MethodRun, class_attention
from .dynamicvit import DynamicViTRun
from .evit import EViTRun
from .evovit import EvoViTRun
from .svit import SViTRun
from .tome import ToMeRun

RUNS: dict[str, type[MethodRun]] = {"svit": SViTRun, "dynamicvit": DynamicViTRun, "evit": EViTRun,
                                    "evovit": EvoViTRun, "ats": ATSRun, "tome": ToMeRun}
METHODS = tuple(RUNS)


def make_gates(config: ViTConfig) -> list[nn.Module]:
    """The selector modules with parameters (``gates.{k}``): SViT's MLP gates, DynamicViT's predictors;
    the attention-based methods have none."""
    if config.method == "svit":
        return svit.make_gates(config)
    if config.method == "dynamicvit":
        return dynamicvit.make_gates(config)
    return []


def virtual_slots(config: ViTConfig) -> int:
    """Extra rows per image a method writes (EViT's fused tokens: one per stage)."""
    return len(config.gate_blocks) if config.method == "evit" and config.fuse_token else 0


__all__ = ["RUNS", "METHODS", "make_gates", "virtual_slots", "MethodRun", "AttentionRecord", "class_attention"]
