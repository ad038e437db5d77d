"""nested_svit: token-pruned Vision Transformers (SViT) on ragged token batches."""
from .checkpoint import load_checkpoint, save_pretrained
from .checkpoint.factory import create_model
from .config import Pruning, ViTConfig
from .model import SparseViT, TokenUsage
from .precision import set_precision
from .registry import list_models
from .tokens import Layout, Packed
from .version import __version__

__all__ = ["create_model", "list_models", "create_detector", "list_detectors", "load_checkpoint", "save_pretrained",
           "load_model",
           "load_detector", "ModelSpec", "SparseViT", "set_precision",
           "TokenUsage", "ViTConfig", "Pruning", "Layout", "Packed", "__version__"]


def __getattr__(name: str):
    """``create_detector`` / ``list_detectors``, ``load_model`` / ``load_detector`` and ``ModelSpec``
    import the detection package (OpenCV, torchvision ops) only when asked for."""
    if name in ("create_detector", "list_detectors"):
        from . import detection

        return getattr(detection, name)
    if name in ("load_model", "load_detector", "ModelSpec"):
        from . import inference

        return getattr(inference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
