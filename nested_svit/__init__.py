"""nested_svit: token-pruned Vision Transformers (SViT) on ragged token batches."""
from .checkpoint import load_checkpoint
from .config import ViTConfig
from .model import SparseViT, TokenUsage
from .registry import create_model, list_models
from .tokens import Layout, Packed

__version__ = "0.1.0"

__all__ = ["create_model", "list_models", "load_checkpoint", "SparseViT", "TokenUsage", "ViTConfig",
           "Layout", "Packed", "__version__"]
