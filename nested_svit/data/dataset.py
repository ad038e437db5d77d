"""Image record data sets: each record (``records.py``) decoded and transformed, never raising for bad
data: an undecodable image is an item with the reason, so it gets a row."""
from __future__ import annotations

import os
from typing import Callable, Iterable

import torch
from PIL import Image
from torch.utils.data import Dataset

from .decode import BadImage, decode_image
from .records import Records, resolve_records
from .transforms import EvalTransform


class ImageRecordDataset(Dataset):
    """Item ``i`` -> dict(index, id, label, image = ``transform(decoded RGB)`` or None, error str or None).
    Classifiers: ``EvalTransform`` -> ``[3, S, S]``; detectors: ``DetectorTransform`` -> (input, meta)."""

    def __init__(self, records: Records, transform: Callable, exif: bool = False, max_pixels: int | None = None):
        self.records = records
        self.transform = transform
        self.exif = exif  # apply EXIF orientation (predict); the ImageNet protocol does not
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.records.labels)

    @property
    def class_names(self) -> list[str] | None:
        return self.records.class_names

    def _raw(self, index: int) -> str | bytes:
        src = self.records.sources
        if isinstance(src, list):
            return src[index]
        cell = src[index]["image"]
        return cell["bytes"] if cell.get("bytes") else cell["path"]

    def image(self, index: int) -> Image.Image:
        """Decoded RGB image ``index`` (no transform); raises ``BadImage`` with the reason."""
        raw = self._raw(index)
        if isinstance(raw, str) and not os.path.exists(raw):
            if os.path.islink(raw):
                raise BadImage(f"broken symbolic link to {os.readlink(raw)}")
            raise BadImage(f"image not found: {raw}")
        try:
            return decode_image(raw, self.max_pixels, self.exif)
        except BadImage as e:
            raise BadImage(f"cannot decode image: {e}") from e

    def __getitem__(self, index: int) -> dict:
        item = {"index": index, "id": self.records.ids[index], "label": self.records.labels[index],
                "image": None, "error": None}
        try:
            item["image"] = self.transform(self.image(index))
        except BadImage as e:
            item["error"] = str(e)
        return item


def open_dataset(path: str | os.PathLike, transform: Callable | None = None, split: str | None = None,
                 exclude: Iterable[str | os.PathLike] = (), exif: bool = False, max_pixels: int | None = None,
                 ) -> ImageRecordDataset:
    """Any input ``records.resolve_records`` takes, decoded and transformed per item (default: the
    DeiT eval transform). ``exclude``: our own output files, never read back as input."""
    return ImageRecordDataset(resolve_records(path, split, exclude), transform or EvalTransform(), exif, max_pixels)


def collate_records(items: list[dict]) -> dict:
    """Batch of items -> dict with ``images [b, 3, S, S]`` of the decodable ones and lists."""
    ok = [it for it in items if it["image"] is not None]
    return {
        "images": torch.stack([it["image"] for it in ok]) if ok else None,
        "index": torch.tensor([it["index"] for it in ok], dtype=torch.int64),
        "label": torch.tensor([it["label"] for it in ok], dtype=torch.int64),
        "id": [it["id"] for it in ok],
        "failed": [(it["index"], it["id"], it["label"], it["error"]) for it in items if it["image"] is None],
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
