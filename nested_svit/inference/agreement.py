"""Decision agreement: whether two runs give an image the same decisions.

A run's decisions on one image are its kept tokens (every selecting stage's keep mask over the tokens
that stage decided on: SViT's gates, DynamicViT's predictors, EViT/Evo-ViT/ATS's selections) and its
top-1 class. Two comparisons use them:

* precision: the model in ``bf16`` (decisions made in fp32, ``precision.set_precision``) against the same
  weights in fp32, on the same images;
* batch: each image in its batch against the same image alone (batch of one), in the same precision.

``agreement(a, b)`` counts the equal decisions; the counts add over batches (``Agreement.add``), so a
run's figure is exact whatever its batches or processes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..model import SparseViT


@dataclass
class Decisions:
    """One forward's decisions on a batch of ``B`` images. ``keep``/``decided``: per selecting stage, a
    ``[B, N]`` bool over each image's tokens (kept; decided by that stage rather than protected);
    ``top1 [B]``; ``logits [B, K]`` (float32)."""

    keep: list[Tensor]
    decided: list[Tensor]
    top1: Tensor
    logits: Tensor


def decisions_from(usage, logits: Tensor) -> Decisions:
    """The decisions of a forward already run: its ``TokenUsage`` and logits ``[B, K]`` (a uniform batch)."""
    logits = logits.float().cpu()
    b = logits.shape[0]
    keep = [m.detach().bool().cpu().view(b, -1) for m in usage.masks]
    decided = [d.detach().bool().cpu().view(b, -1) for d in usage.decided]
    return Decisions(keep, decided, logits.argmax(-1), logits)


def decisions_of(model: SparseViT | Callable[[Tensor], Tensor], images: Tensor) -> Decisions:
    """Run ``model`` on ``images [B, 3, H, W]`` -> its decisions. Our models get the images in their input
    dtype; any other callable (timm's model, a runtime's runner) is a dense classifier: logits only, no
    kept tokens."""
    if not isinstance(model, SparseViT):
        with torch.no_grad():
            logits = model(images).float().cpu()
        return Decisions([], [], logits.argmax(-1), logits)
    with torch.no_grad():
        feats, usage = model.forward_features(images.to(model.dtype), return_usage=True)
        return decisions_from(usage, model.forward_head(feats))


def alone(model: SparseViT | Callable[[Tensor], Tensor], images: Tensor) -> Decisions:
    """The decisions of each image run alone (batches of one), stacked as one batch's."""
    parts = [decisions_of(model, images[i:i + 1]) for i in range(images.shape[0])]
    return Decisions([torch.cat([p.keep[s] for p in parts]) for s in range(len(parts[0].keep))],
                     [torch.cat([p.decided[s] for p in parts]) for s in range(len(parts[0].decided))],
                     torch.cat([p.top1 for p in parts]), torch.cat([p.logits for p in parts]))


@dataclass
class Agreement:
    """Equal decisions of two runs, as counts. ``tokens_equal``/``tokens``: kept-token decisions equal /
    compared (over every stage's decided tokens); ``top1_equal``/``images``; ``images_equal``: images
    whose every decision (kept tokens and top-1) is equal; ``max_logit_diff``: the largest |difference|
    of a logit."""

    tokens_equal: int = 0
    tokens: int = 0
    top1_equal: int = 0
    images: int = 0
    images_equal: int = 0
    max_logit_diff: float = 0.0
    image_tokens_equal: list[int] = field(default_factory=list, repr=False)
    image_tokens: list[int] = field(default_factory=list, repr=False)
    image_top1_equal: list[bool] = field(default_factory=list, repr=False)

    def add(self, other: "Agreement") -> "Agreement":
        self.tokens_equal += other.tokens_equal
        self.tokens += other.tokens
        self.top1_equal += other.top1_equal
        self.images += other.images
        self.images_equal += other.images_equal
        self.max_logit_diff = max(self.max_logit_diff, other.max_logit_diff)
        self.image_tokens_equal += other.image_tokens_equal
        self.image_tokens += other.image_tokens
        self.image_top1_equal += other.image_top1_equal
        return self

    @property
    def kept_tokens(self) -> float:
        """Fraction of kept-token decisions that are equal (1.0 for a model that decides nothing)."""
        return self.tokens_equal / self.tokens if self.tokens else 1.0

    @property
    def top1(self) -> float:
        return self.top1_equal / self.images if self.images else float("nan")

    def summary(self) -> dict:
        return {"kept_tokens": self.kept_tokens, "top1": self.top1, "images_all_equal": self.images_equal,
                "images": self.images, "tokens_compared": self.tokens, "max_logit_diff": self.max_logit_diff}


def agreement(a: Decisions, b: Decisions) -> Agreement:
    """Count the decisions ``a`` and ``b`` (the same images, in the same order) share. A token counts
    where either run decided on it."""
    if a.top1.shape != b.top1.shape or len(a.keep) != len(b.keep):
        raise ValueError("the two runs did not see the same images with the same stages")
    top1_equal = a.top1 == b.top1
    equal_image = top1_equal.clone()
    tokens_equal = torch.zeros(a.top1.shape, dtype=torch.int64)
    tokens = torch.zeros(a.top1.shape, dtype=torch.int64)
    for ka, kb, da, db in zip(a.keep, b.keep, a.decided, b.decided):
        decided = da | db
        same = (ka == kb) | ~decided
        tokens_equal += (same & decided).sum(-1)
        tokens += decided.sum(-1)
        equal_image &= same.all(-1)
    diff = float((a.logits - b.logits).abs().max()) if a.logits.numel() else 0.0
    return Agreement(int(tokens_equal.sum()), int(tokens.sum()), int(top1_equal.sum()), int(a.top1.numel()),
                     int(equal_image.sum()), diff, tokens_equal.tolist(), tokens.tolist(), top1_equal.tolist())
