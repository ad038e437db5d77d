"""The detectors' input transform, mmdet 2.28's test pipeline for one image: keep-ratio resize of the
uint8 image with OpenCV's INTER_LINEAR to fit ``img_scale`` (sizes ``int(x * s + 0.5)``; OpenCV, not
Pillow, for mmdet-exact pixels), normalisation with ImageNet mean/std in RGB (float32, as mmcv's
``imnormalize``), zero padding (after normalisation) of the bottom/right to a multiple of 32. Every
image keeps its own padded size."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from .decode import BadImage, decode_rgb_array

MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float64)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float64)
SIZE_DIVISOR = 32


@dataclass(frozen=True)
class ImageMeta:
    """mmdet's per-image metas: shapes are (h, w, 3); ``scale_factor`` is float32 (w, h, w, h)."""

    ori_shape: tuple[int, int, int]
    img_shape: tuple[int, int, int]
    pad_shape: tuple[int, int, int]
    scale_factor: tuple[float, float, float, float]

    def scale_tensor(self, device: torch.device | str = "cpu") -> Tensor:
        from ..devices import constant

        return constant(self.scale_factor, torch.float32, device)


def rescale_size(width: int, height: int, img_scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``rescale_size`` with a (long, short) scale: -> (new_w, new_h)."""
    s = min(max(img_scale) / max(height, width), min(img_scale) / min(height, width))
    return int(width * float(s) + 0.5), int(height * float(s) + 0.5)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """File -> RGB uint8 ``[H, W, 3]``, EXIF orientation applied (as mmdet's ``LoadImageFromFile``
    with OpenCV). Raises ``BadImage`` (a ``ValueError``) naming the file."""
    path = Path(path)
    if not path.is_file():
        raise BadImage(f"image not found: {path}")
    try:
        return decode_rgb_array(str(path), exif=True)
    except BadImage as e:
        raise BadImage(f"cannot decode image {path}: {e}") from e


def as_rgb_uint8(image: np.ndarray | Tensor) -> np.ndarray:
    """An image array or tensor -> contiguous RGB uint8 ``[H, W, 3]``, converted as image files are
    (``decode.decode_image``): ``[H, W, 3]`` or ``[3, H, W]``; grayscale ``[H, W]``, ``[H, W, 1]`` or
    ``[1, H, W]`` replicated; RGBA's alpha dropped; floats in 0..1 scaled by 255 (others refused: the
    range is ambiguous), 16-bit divided by 256. Anything else is a ``ValueError`` saying what to pass."""
    if image is None:
        raise ValueError("image is None: pass a file path or an RGB uint8 array [H, W, 3]")
    if isinstance(image, Tensor):
        arr = image.detach().cpu()
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.permute(1, 2, 0)
        image = arr.float().numpy() if arr.dtype in (torch.bfloat16, torch.float16) else arr.numpy()
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or image.dtype == bool:
        raise ValueError(f"expected an RGB image [H, W, 3] (or grayscale [H, W], RGBA [H, W, 4]), got shape "
                         f"{image.shape} {image.dtype}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"empty image of shape {image.shape}")
    if np.issubdtype(image.dtype, np.floating):
        arr = np.nan_to_num(image.astype(np.float32))
        if arr.size and (float(arr.max()) > 1.0 or float(arr.min()) < 0.0):
            raise ValueError(f"float pixels outside 0..1 ({float(arr.min()):g}..{float(arr.max()):g}): pass uint8 "
                             "0..255, or floats scaled to 0..1")
        image = np.rint(arr * 255.0).astype(np.uint8)
    elif image.dtype == np.uint16:
        image = (image / 256).astype(np.uint8)
    elif image.dtype != np.uint8:
        if image.min() < 0 or image.max() > 255:
            raise ValueError(f"expected uint8 pixels (0..255), got {image.dtype} in {image.min()}..{image.max()}")
        image = image.astype(np.uint8)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def normalize_pad(resized: np.ndarray) -> Tensor:
    """Resized RGB uint8 ``[h, w, 3]`` -> normalised float32 ``[3, H_pad, W_pad]``, zero-padded to /32."""
    new_h, new_w = resized.shape[:2]
    img = resized.astype(np.float32)
    cv2.subtract(img, MEAN.reshape(1, -1), img)
    cv2.multiply(img, 1 / STD.reshape(1, -1), img)
    pad_h = -(-new_h // SIZE_DIVISOR) * SIZE_DIVISOR
    pad_w = -(-new_w // SIZE_DIVISOR) * SIZE_DIVISOR
    padded = np.zeros((pad_h, pad_w, 3), dtype=np.float32)
    padded[:new_h, :new_w] = img
    return torch.from_numpy(padded).permute(2, 0, 1).contiguous()


def preprocess(image: np.ndarray | Tensor, img_scale: tuple[int, int] = (1333, 800)) -> tuple[Tensor, ImageMeta]:
    """RGB uint8 image -> (normalised, padded ``[3, H_pad, W_pad]`` float32, metas)."""
    rgb = as_rgb_uint8(image)
    h, w = rgb.shape[:2]
    new_w, new_h = rescale_size(w, h, img_scale)
    padded = normalize_pad(cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR))
    scale = np.array([new_w / w, new_h / h, new_w / w, new_h / h], dtype=np.float32)
    meta = ImageMeta((h, w, 3), (new_h, new_w, 3), (padded.shape[1], padded.shape[2], 3),
                     tuple(float(v) for v in scale))
    return padded, meta


@dataclass(frozen=True)
class DetectorTransform:
    """Decoded RGB image (PIL or uint8 array) -> ``(input [3, H_pad, W_pad], ImageMeta)`` at ``img_scale``."""

    img_scale: tuple[int, int] = (1333, 800)

    def __call__(self, image) -> tuple[Tensor, ImageMeta]:
        return preprocess(np.asarray(image), self.img_scale)

    def describe(self) -> dict:
        return {"img_scale": list(self.img_scale), "resize": "cv2 INTER_LINEAR keep-ratio", "pad": 32}
