"""Evaluation transforms of the checkpoint families (DeiT/timm convention)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvalTransform:
    """Resize the short side to ``floor(img_size / crop_pct)`` (bicubic), center-crop ``img_size``,
    scale to [0, 1], normalise. DeiT: 224 / 0.875 = 256. Same arithmetic as timm's eval transform."""

    img_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def resize_to(self) -> int:
        return math.floor(self.img_size / self.crop_pct)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> ``[3, img_size, img_size]`` float32."""
        img = TF.resize(image, self.resize_to, interpolation=InterpolationMode(self.interpolation))
        img = TF.center_crop(img, [self.img_size, self.img_size])
        return TF.normalize(TF.pil_to_tensor(img).float().div_(255), self.mean, self.std)

    def describe(self) -> dict:
        return {**asdict(self), "resize_to": self.resize_to}
