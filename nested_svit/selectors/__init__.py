"""Token selectors: given the full feature map, decide which tokens the next block processes."""
from .base import TokenSelector
from .mlp_gate import MlpGate

__all__ = ["TokenSelector", "MlpGate"]
