"""Robust image decoding: every image becomes RGB, or a reason why it could not."""
from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError


class BadImage(Exception):
    """An image that cannot be decoded; ``str()`` is the reason recorded in outputs."""


def decode_image(source: str | bytes) -> Image.Image:
    """Path or encoded bytes -> fully decoded RGB image. Grayscale, palette, CMYK, 16-bit and alpha
    images are converted (alpha dropped, as timm/DeiT do); truncated or unreadable files raise
    ``BadImage``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            img.load()
    except FileNotFoundError as e:
        raise BadImage(f"missing file: {e}") from e
    except UnidentifiedImageError as e:
        raise BadImage("not a recognised image format") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImage(f"corrupt or unreadable image: {e}") from e
    if img.width < 1 or img.height < 1:
        raise BadImage(f"empty image {img.width}x{img.height}")
    if img.mode == "I;16" or img.mode == "I":
        img = img.point(lambda v: v * (1 / 256)).convert("L")
    return img.convert("RGB") if img.mode != "RGB" else img
