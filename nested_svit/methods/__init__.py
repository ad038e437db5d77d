"""Token-pruning methods on the one engine: SViT and the paper's baselines (protocol: ``base.py``).

The table below is the only list of methods: a new method is a ``methods/<name>.py`` exporting its
``METHOD`` descriptor, one line here, and a reference test.
"""
from __future__ import annotations

from ..attention import class_attention
from ..execution import AttentionRecord
from . import atc, ats, diffrate, dynamicvit, evit, evovit, mctf, svit, tome
from .base import Method, MethodRun

METHODS: dict[str, Method] = {m.name: m for m in (svit.METHOD, dynamicvit.METHOD, evit.METHOD, evovit.METHOD,
                                                  ats.METHOD, tome.METHOD, atc.METHOD,
                                                  diffrate.METHOD, mctf.METHOD)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; choose from {tuple(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "get_method", "Method", "MethodRun", "AttentionRecord", "class_attention"]
