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
CROP_MODES = ("center", "squash")
# the settings an eval transform takes from a model's ``pretrained_cfg`` (and the flags that override them)
SETTINGS = ("crop_pct", "crop_mode", "interpolation", "mean", "std")
# DeiT's eval settings: what a model whose checkpoint says nothing runs with
DEIT_EVAL = {"crop_pct": 0.875, "crop_mode": "center", "interpolation": "bicubic", "mean": IMAGENET_MEAN,
             "std": IMAGENET_STD}


@dataclass(frozen=True)
class EvalTransform:
    """Resize to ``floor(img_size / crop_pct)`` (bicubic), center-crop ``img_size``, scale to [0, 1],
    normalise. DeiT: 224 / 0.875 = 256. Same arithmetic as timm's eval transform, whose ``crop_mode``
    says what is resized: ``center`` the short side (aspect kept), ``squash`` both sides (as transformers'
    image processors: DeiT 256 x 256 then a 224 crop; ViT 224 x 224, no crop).
    ``transform(image)`` == ``transform.normalize(transform.crop(image)[None])[0]``, bit for bit."""

    img_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, not {self.crop_mode!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(v > 0 for v in self.std):
            raise ValueError(f"mean and std take 3 values each (std > 0), got {self.mean} and {self.std}")

    @property
    def resize_to(self) -> int:
        return math.floor(self.img_size / self.crop_pct)

    @property
    def _size(self) -> int | list[int]:
        return self.resize_to if self.crop_mode == "center" else [self.resize_to, self.resize_to]

    def crop(self, image: Image.Image) -> Tensor:
        """PIL RGB image -> resized, center-cropped uint8 ``[3, img_size, img_size]``."""
        img = TF.resize(image, self._size, interpolation=InterpolationMode(self.interpolation))
        return TF.pil_to_tensor(TF.center_crop(img, [self.img_size, self.img_size]))

    def crop_tensor(self, image: Tensor) -> Tensor:
        """``crop`` of a decoded uint8 ``[3, H, W]`` tensor on any device (torch's antialiased resize:
        within 3 grey levels of Pillow's, 0.2 on average: tests/test_input_pipeline.py)."""
        img = TF.resize(image, self._size, interpolation=InterpolationMode(self.interpolation), antialias=True)
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
    def for_model(cls, pretrained_cfg: dict | None, img_size: int, **overrides) -> "EvalTransform":
        """The eval transform of a model (timm's ``resolve_data_config``): its ``pretrained_cfg``
        (``SETTINGS``) at its input size, with ``overrides`` (a flag's value; None: the model's)."""
        bad = sorted(set(overrides) - set(SETTINGS))
        if bad:
            raise TypeError(f"unknown eval transform setting(s) {bad}; known: {SETTINGS}")
        cfg = {k: v for k, v in (pretrained_cfg or {}).items() if k in SETTINGS and v is not None}
        values = {**DEIT_EVAL, **cfg, **{k: v for k, v in overrides.items() if v is not None}}
        return cls(img_size=img_size, **{k: tuple(v) if k in ("mean", "std") else v for k, v in values.items()})

    def describe(self) -> dict:
        return {**asdict(self), "resize_to": self.resize_to}


def settings_from(given: dict[str, str] | None, overrides: dict) -> dict[str, str]:
    """Where each eval setting came from: ``flag`` (an override), the file the model's config came from
    (``given``: setting -> source), or ``model default`` (the registry's)."""
    return {k: "flag" if overrides.get(k) is not None else (given or {}).get(k, "model default") for k in SETTINGS}
