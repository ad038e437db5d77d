"""Reduced precision that keeps the decisions: the one place that says which parts of a model run in
the requested precision and which stay fp32 (every token stack's ``decision_modules``)."""
from __future__ import annotations

from torch import nn

from .devices import dtype_of
from .stack import TokenStack


def set_precision(module: nn.Module, precision: str) -> nn.Module:
    """Cast ``module`` (a model, or a detector holding token stacks) to ``precision`` (``fp32``, ``bf16``,
    ``fp16``) except every token stack's ``decision_modules``, which stay fp32: linears and attention run
    in reduced precision, gate margins, predictor scores and the classifier's norm and head in fp32 (class
    attention and ToMe's similarities are fp32 anyway; torch's kernels accumulate LayerNorm statistics
    and the softmax in fp32). -> ``module``."""
    dtype = dtype_of(precision)
    deciders = [d for stack in module.modules() if isinstance(stack, TokenStack) for d in stack.decision_modules()]
    keep = {id(t) for d in deciders for t in [*d.parameters(), *d.buffers()]}  # never rounded through bf16
    module._apply(lambda t: t if id(t) in keep or not t.is_floating_point() else t.to(dtype))
    for decider in deciders:
        decider.float()
    module.precision = precision  # type: ignore[assignment]
    return module


def sync_decisions(reference: nn.Module, model: nn.Module) -> None:
    """Give ``reference`` (the same weights in another precision) ``model``'s decision modules as they are
    now, e.g. after its gates were calibrated: both are fp32, so the copy is exact."""
    pairs = zip([s for s in reference.modules() if isinstance(s, TokenStack)],
                [s for s in model.modules() if isinstance(s, TokenStack)])
    for ref, own in pairs:
        for a, b in zip(ref.decision_modules(), own.decision_modules()):
            a.load_state_dict(b.state_dict())
        ref.keep_targets_in_use = own.keep_targets_in_use
