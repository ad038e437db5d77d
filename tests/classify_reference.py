"""An independent classifier pipeline for the eval tests: a small SViT checkpoint, and its logits by
torchvision's transforms (timm/DeiT eval recipe) and a per-image forward of the reference execution."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T

from nested_svit import create_model, load_checkpoint

IMG = 64
MODEL_ARGS = ["--model", "svit_tiny", "--img-size", str(IMG), "--workers", "0", "--threads", "2"]


def write_checkpoint(path: Path, head_scale: float = 1.0, seed: int = 0) -> Path:
    """A random svit_tiny at ``IMG`` px (``head_scale``: the head's weights scaled, so that the softmax
    spreads over the confidence bins as a trained model's does) as a ``{"model": ...}`` file."""
    torch.manual_seed(seed)
    model = create_model("svit_tiny", img_size=IMG)
    with torch.no_grad():
        model.head.weight.mul_(head_scale)
    torch.save({"model": model.state_dict()}, path)
    return path


def reference_logits(checkpoint: Path, pil_images: list[Image.Image]) -> torch.Tensor:
    """``[n, 1000]``: torchvision transforms + per-image reference forward of ``checkpoint``."""
    model = create_model("svit_tiny", img_size=IMG)
    load_checkpoint(model, checkpoint)
    model.eval().set_execution("reference")
    tf = T.Compose([T.Resize(int(IMG / 0.875), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(IMG),
                    T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with torch.no_grad():
        return torch.cat([model(tf(img.convert("RGB")).unsqueeze(0)) for img in pil_images])
