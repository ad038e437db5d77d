"""Reduced precision that keeps the decisions: the one place that says which parts of a model run in
the requested precision and which stay fp32 (every token stack's ``decision_modules``)."""
from __future__ import annotations

from torch import nn

from .devices import dtype_of
from .stack import TokenStack


def set_precision(module: nn.Module, precision: str) -> nn.Module:
    """Run ``module`` in ``precision`` (``fp32``, ``bf16``, ``fp16``, ``int8``) for inference with every decision
    in fp32. ``int8`` (CPU, classifiers): the same scope in int8 (``layers.Linear.quantize_int8``: weights per
    output channel, activations per token), everything else fp32.

    A token stack that names its ``reduced_precision_modules()`` (the classifier: its blocks' linears) casts
    only those: qkv, projection and MLP matmuls and the attention between them run in ``precision``, while
    the embedding, every LayerNorm, the residual stream (the feature map the gates read), the selectors and
    the head stay fp32 (``layers.Linear`` casts its input to its weight's dtype). Measured on SViT-S (random
    weights, calibrated gates, 32 synthetic images): 99.88% of kept-token decisions equal to fp32's, against
    99.69% when the stream is bf16 too, for 3% more time. Any other module (a detector) is cast whole except
    its token stacks' ``decision_modules`` (gates and predictors, never rounded through bf16). Class
    attention and ToMe's similarities are fp32 anyway; torch's bf16 SDPA accumulates the softmax in fp32.
    -> ``module``."""
    dtype = dtype_of(precision)
    scope = module.reduced_precision_modules() if isinstance(module, TokenStack) else None
    if precision == "int8":
        _check_int8(module, scope)
    if scope is not None:
        module.float()
        for part in scope:
            part.int8 = None
            part.to(dtype)
            if precision == "int8":
                part.quantize_int8()
    else:
        deciders = [d for stack in module.modules() if isinstance(stack, TokenStack) for d in stack.decision_modules()]
        keep = {id(t) for d in deciders for t in [*d.parameters(), *d.buffers()]}  # never rounded through bf16
        module._apply(lambda t: t if id(t) in keep or not t.is_floating_point() else t.to(dtype))
        for decider in deciders:
            decider.float()
    module.precision = precision  # type: ignore[assignment]
    return module


def _check_int8(module: nn.Module, scope: list[nn.Module] | None) -> None:
    """int8 is built for a classifier's block linears on a CPU (``torch._int_mm``; VNNI on x86)."""
    if scope is None:
        raise ValueError("--precision int8 runs a classifier's block linears in int8; a detector runs fp32, bf16 "
                         "or fp16")
    device = next(module.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"--precision int8 is built for CPUs (torch._int_mm), not {device}; use bf16 or fp16")


def sync_decisions(reference: nn.Module, model: nn.Module) -> None:
    """Give ``reference`` (the same weights in another precision) ``model``'s decision modules as they are
    now, e.g. after its gates were calibrated: both are fp32, so the copy is exact."""
    pairs = zip([s for s in reference.modules() if isinstance(s, TokenStack)],
                [s for s in model.modules() if isinstance(s, TokenStack)])
    for ref, own in pairs:
        for a, b in zip(ref.decision_modules(), own.decision_modules()):
            a.load_state_dict(b.state_dict())
        ref.keep_targets_in_use = own.keep_targets_in_use
