"""Evaluation transforms of the checkpoint families (DeiT/timm convention), split where the input
pipeline splits them: ``crop`` (resize + center crop to uint8, in the loader's workers, or on the device
with ``crop_tensor``) and ``normalize`` (on the device, after the uint8 batch is uploaded)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..devices import constant

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvalTransform:
    """Resize the short side to ``floor(img_size / crop_pct)`` (bicubic), center-crop ``img_size``,
    scale to [0, 1], normalise. DeiT: 224 / 0.875 = 256. Same arithmetic as timm's eval transform.
    ``transform(image)`` == ``transform.normalize(transform.crop(image)[None])[0]``, bit for bit."""

    img_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def resize_to(self) -> int:
        return math.floor(self.img_size / self.crop_pct)

    def crop(self, image: Image.Image) -> Tensor:
        """PIL RGB image -> resized, center-cropped uint8 ``[3, img_size, img_size]``."""
        img = TF.resize(image, self.resize_to, interpolation=InterpolationMode(self.interpolation))
        return TF.pil_to_tensor(TF.center_crop(img, [self.img_size, self.img_size]))

    def crop_tensor(self, image: Tensor) -> Tensor:
        """``crop`` of a decoded uint8 ``[3, H, W]`` tensor on any device (torch's antialiased resize:
        within 3 grey levels of Pillow's, 0.2 on average: tests/test_input_pipeline.py)."""
        img = TF.resize(image, self.resize_to, interpolation=InterpolationMode(self.interpolation), antialias=True)
        return TF.center_crop(img, [self.img_size, self.img_size])

    def normalize(self, batch: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """uint8 ``[B, 3, S, S]`` on any device -> normalised ``[B, 3, S, S]`` in ``dtype`` (computed in
        float32, as ``__call__``; the constants are cached on the device)."""
        mean = constant(self.mean, torch.float32, batch.device).view(3, 1, 1)
        std = constant(self.std, torch.float32, batch.device).view(3, 1, 1)
        out = batch.to(torch.float32).div_(255).sub_(mean).div_(std)
        return out if dtype == torch.float32 else out.to(dtype)

    def __call__(self, image: Image.Image) -> Tensor:
        """PIL RGB image -> ``[3, img_size, img_size]`` float32."""
        return self.normalize(self.crop(image)[None])[0]

    @classmethod
    def for_model(cls, pretrained_cfg: dict | None, img_size: int, crop_pct: float | None = None,
                  interpolation: str | None = None) -> "EvalTransform":
        """The eval transform of a model (timm's ``resolve_data_config``): its ``pretrained_cfg``
        (crop_pct, interpolation, mean, std) at its input size, with the given overrides."""
        cfg = dict(pretrained_cfg or {})
        return cls(img_size=img_size, crop_pct=crop_pct if crop_pct is not None else cfg.get("crop_pct", 0.875),
                   interpolation=interpolation or cfg.get("interpolation", "bicubic"),
                   mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)))

    def describe(self) -> dict:
        return {**asdict(self), "resize_to": self.resize_to}
