"""Image record data sets: each record (``records.py``) decoded and transformed, never raising for bad
data: an undecodable image is an item with the reason, so it gets a row. With ``encoded_jpegs`` the
JPEGs a batched decoder takes are passed on undecoded (``device_decode.py``)."""
from __future__ import annotations

import os
from typing import Callable, Iterable

import torch
from PIL import Image
from torch.utils.data import Dataset

from .decode import BadImage, TooLarge, decode_image, jpeg_header
from .objectstore import is_uri, read_object
from .records import Records, resolve_records
from .transforms import EvalTransform


class ImageRecordDataset(Dataset):
    """Item ``i`` -> dict(index, id, label, image = ``transform(decoded RGB)`` or None, error str or None).
    Classifiers: ``EvalTransform`` -> ``[3, S, S]``; detectors: ``DetectorTransform`` -> (input, meta)."""

    def __init__(self, records: Records, transform: Callable, exif: bool = False, max_pixels: int | None = None,
                 draft: tuple[int, int] | None = None, encoded_jpegs: bool = False):
        self.records = records
        self.transform = transform
        self.exif = exif  # apply EXIF orientation (predict); the ImageNet protocol does not
        self.max_pixels = max_pixels
        self.draft = draft  # decode JPEGs at a reduced DCT scale of at least this (w, h) (decode.decode_image)
        self.encoded_jpegs = encoded_jpegs  # items carry the bytes of device-decodable JPEGs (--decode gpu)

    def __len__(self) -> int:
        return len(self.records.labels)

    @property
    def class_names(self) -> list[str] | None:
        return self.records.class_names

    @staticmethod
    def collate(items: list[dict]) -> dict:
        """The loader's ``collate_fn`` for these items (``collate_records``)."""
        return collate_records(items)

    def _raw(self, index: int) -> str | bytes:
        src = self.records.sources
        if isinstance(src, list):
            return src[index]
        cell = src[index]["image"]
        return cell["bytes"] if cell.get("bytes") else cell["path"]

    def _existing(self, index: int) -> str | bytes:
        raw = self._raw(index)
        if isinstance(raw, str) and is_uri(raw):
            try:
                return read_object(raw)  # one GET, in the loader worker that decodes it
            except FileNotFoundError as e:
                raise BadImage(f"image not found: {e}") from e
        if isinstance(raw, str) and not os.path.exists(raw):
            if os.path.islink(raw):
                raise BadImage(f"broken symbolic link to {os.readlink(raw)}")
            raise BadImage(f"image not found: {raw}")
        return raw

    def image(self, index: int, raw: str | bytes | None = None) -> Image.Image:
        """Decoded RGB image ``index`` (no transform); raises ``BadImage`` with the reason."""
        raw = self._existing(index) if raw is None else raw
        try:
            return decode_image(raw, self.max_pixels, self.exif, self.draft)
        except TooLarge:
            raise
        except BadImage as e:
            raise BadImage(f"cannot decode image: {e}") from e

    def __getitem__(self, index: int) -> dict:
        item = {"index": index, "id": self.records.ids[index], "label": self.records.labels[index],
                "image": None, "error": None, "encoded": None, "orientation": None}
        try:
            raw = None
            if self.encoded_jpegs:
                raw = self._existing(index)
                if isinstance(raw, str):
                    with open(raw, "rb") as f:
                        raw = f.read()
                orientation, _, found = jpeg_header(raw, self.max_pixels)
                if orientation:
                    item["orientation"] = found
                    item["encoded"] = {"data": torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                                       "orientation": orientation if self.exif else 1, "found": item["orientation"]}
                    return item
            decoded = self.image(index, raw)
            item["orientation"] = decoded.info.get("exif_orientation")
            item["image"] = self.transform(decoded)
        except OSError as e:
            item["error"] = f"cannot read image: {e}"
        except BadImage as e:
            item["error"] = str(e)
        return item


def open_dataset(path: str | os.PathLike, transform: Callable | None = None, split: str | None = None,
                 exclude: Iterable[str | os.PathLike] = (), exif: bool = False, max_pixels: int | None = None,
                 uri_column: str | None = None, **options) -> ImageRecordDataset:
    """Any input ``records.resolve_records`` takes, decoded and transformed per item (default: the
    DeiT eval transform). ``exclude``: our own output files, never read back as input; ``uri_column``: a
    manifest's image column. ``options``:
    ``draft``, ``encoded_jpegs`` (``ImageRecordDataset``)."""
    return ImageRecordDataset(resolve_records(path, split, exclude, uri_column), transform or EvalTransform(), exif, max_pixels,
                              **options)


def collate_records(items: list[dict]) -> dict:
    """Batch of items -> dict with ``images [b, 3, S, S]`` of the decoded ones and lists; ``encoded``: the
    items still to decode (``device_decode.DeviceJpegDecoder`` finishes those)."""
    ok = [it for it in items if it["image"] is not None]
    return {
        "images": torch.stack([it["image"] for it in ok]) if ok else None,
        "index": torch.tensor([it["index"] for it in ok], dtype=torch.int64),
        "label": torch.tensor([it["label"] for it in ok], dtype=torch.int64),
        "id": [it["id"] for it in ok],
        "decoder": ["pil"] * len(ok),
        "orientation": [it.get("orientation") for it in ok],  # EXIF orientation found, 1..8 or None
        "failed": [(it["index"], it["id"], it["label"], it["error"]) for it in items
                   if it["image"] is None and it.get("encoded") is None],
        "encoded": [{"index": it["index"], "id": it["id"], "label": it["label"], **it["encoded"]} for it in items
                    if it.get("encoded") is not None],
        "all_index": [it["index"] for it in items],
    }


def load_images_from_dir(path: str | os.PathLike, count: int, img_size: int = 224) -> torch.Tensor:
    """First ``count`` decodable images under ``path`` (cycled if fewer) -> ``[count, 3, S, S]``."""
    ds = open_dataset(path, EvalTransform(img_size=img_size))
    images = []
    for i in range(len(ds)):
        item = ds[i]
        if item["image"] is not None:
            images.append(item["image"])
        if len(images) >= count:
            break
    if not images:
        raise FileNotFoundError(f"no decodable images under {path}")
    return torch.stack([images[i % len(images)] for i in range(count)])
