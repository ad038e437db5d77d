"""Robust image decoding, for classifiers and detectors alike: every image becomes RGB, or a reason why
it could not (``BadImage``). Pillow decodes JPEGs to the same pixels as OpenCV's ``imdecode`` (both
libjpeg-turbo), which mmdet's ``LoadImageFromFile`` uses."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112
# Pillow warns above 89 Mpx and refuses above 179 Mpx ("decompression bomb"); real photos (panoramas,
# 100+ Mpx sensors) exceed that. Our limit: 1 gigapixel (about 3 GB decoded), changeable per call
# (``--max-image-pixels``).
MAX_IMAGE_PIXELS = 1_000_000_000


class BadImage(ValueError):
    """An image that cannot be decoded; ``str()`` is the reason recorded in outputs."""


class TooLarge(BadImage):
    """An image above the pixel limit: a size limit, not a defect of the file."""


def size_limit_reason(width: int, height: int, limit: int) -> str:
    return (f"image of {width}x{height} = {width * height:,} pixels is above the size limit of {limit:,} pixels "
            "(--max-image-pixels; the file may be fine: raise the limit to read it)")


def exif_orientation(img: Image.Image) -> int | None:
    """The EXIF orientation tag a file carries (1..8), None without one (or an invalid one)."""
    try:
        value = int(img.getexif().get(EXIF_ORIENTATION, 0) or 0)
    except Exception:  # noqa: BLE001 - an unreadable EXIF block: no orientation
        return None
    return value if 1 <= value <= 8 else None


def decode_image(source: str | bytes, max_pixels: int | None = None, exif: bool = False,
                 draft: tuple[int, int] | None = None) -> Image.Image:
    """Path or encoded bytes -> fully decoded RGB image. Grayscale, palette, CMYK, 16-bit, float and
    alpha images are converted (alpha dropped, as timm/DeiT do); truncated or unreadable files and
    images above ``max_pixels`` raise ``BadImage``. ``exif``: apply the EXIF orientation (phone photos);
    the ImageNet eval protocol does not. ``draft`` (w, h): a JPEG is decoded at the smallest DCT scale
    (1/2, 1/4, 1/8) that keeps it at least this size (much faster for large photos; the pixels differ
    slightly from a full decode, so it is opt-in and recorded). The EXIF orientation found (applied or
    not) is in the result's ``info["exif_orientation"]`` (1..8 or None)."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
            if img.width * img.height > limit:
                raise TooLarge(size_limit_reason(img.width, img.height, limit))
            if draft is not None and img.format == "JPEG":
                img.draft("RGB", draft)
            img.load()
            orientation = exif_orientation(img)
            if exif:
                img = ImageOps.exif_transpose(img)
    except BadImage:
        raise
    except FileNotFoundError as e:
        raise BadImage(f"missing file: {e}") from e
    except UnidentifiedImageError as e:
        raise BadImage("not a recognised image format") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImage(f"corrupt or unreadable image: {e}") from e
    if img.width < 1 or img.height < 1:
        raise BadImage(f"empty image {img.width}x{img.height}")
    if img.mode == "F":  # float images: 0..1 (scientific / HDR exports) or 0..255
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32))
        scale = 255.0 if arr.size and float(arr.max()) <= 1.0 else 1.0
        img = Image.fromarray(np.rint(arr * scale).clip(0, 255).astype(np.uint8), "L")
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((arr / 256).clip(0, 255).astype(np.uint8), "L")
    img = img.convert("RGB") if img.mode != "RGB" else img
    img.info["exif_orientation"] = orientation
    return img


def decode_rgb_array(source: str | bytes, max_pixels: int | None = None, exif: bool = False) -> np.ndarray:
    """``decode_image`` as an RGB uint8 ``[H, W, 3]`` array (the detectors' input)."""
    return np.ascontiguousarray(np.asarray(decode_image(source, max_pixels, exif)))


_EOI = b"\xff\xd9"


def jpeg_for_device(data: bytes, max_pixels: int | None = None) -> tuple[int, str]:
    """Whether encoded ``data`` can go to a batched JPEG decoder (nvjpeg, torchvision's): a complete
    (ends with the EOI marker) baseline or progressive JPEG in YCbCr or grayscale under ``max_pixels``.
    Reads the header only. -> (EXIF orientation 1..8, "") or (0, why not: the file then takes Pillow's
    path, which handles CMYK, other formats, and gives corrupt files their reason)."""
    orientation, why, _ = jpeg_header(data, max_pixels)
    return orientation, why


def jpeg_header(data: bytes, max_pixels: int | None = None) -> tuple[int, str, int | None]:
    """``jpeg_for_device``'s answer and the EXIF orientation tag found (1..8, None without one), from one
    read of the header."""
    if not data.startswith(b"\xff\xd8"):
        return 0, "not a JPEG", None
    if not data.rstrip(b"\x00\r\n ").endswith(_EOI):
        return 0, "no end-of-image marker (truncated, or data after the image)", None
    try:
        with Image.open(io.BytesIO(data)) as img:
            found = exif_orientation(img)
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return 0, f"JPEG in {img.mode}", found
            if img.width * img.height > (MAX_IMAGE_PIXELS if max_pixels is None else max_pixels):
                return 0, "above the pixel limit", found
    except Exception as e:  # any header Pillow cannot read: Pillow's decode path reports it
        return 0, f"unreadable header: {e}", None
    return found or 1, "", found
