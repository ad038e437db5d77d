"""Data sets of image records (index, source, label) on local disk, decoded robustly.

Layouts (all offline):
* ImageFolder: ``DIR/<class>/<image>`` (e.g. ImageNet ``val/<wnid>/*.JPEG``); labels are sorted class
  directory names. A flat directory of images has no labels (label -1).
* Hugging Face parquet shards (``*.parquet`` with ``image``/``label`` columns) or a ``save_to_disk``
  Arrow folder; class names from the ``label`` feature when it is a ``ClassLabel``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from .classes import imagenet_classes, imagenet_index
from .decode import BadImage, decode_image
from .transforms import EvalTransform

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class Records:
    sources: list  # paths (str) or a datasets.Dataset with undecoded images
    labels: list[int]
    ids: list[str]  # stable per-image identifier: relative path, or "<split>/<row>"
    class_names: list[str] | None
    kind: str
    label_source: str = "none"  # imagenet_wnid | sorted_class_dirs | dataset_label | none


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _folder_records(root: Path) -> Records:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    wnid_index = None
    if classes:
        # ImageNet wnid directories (all 1000 or a subset) get the standard ImageNet indices and names;
        # other trees get 0..K-1 in sorted order, as torchvision's ImageFolder does.
        wnid_index = imagenet_index(classes)
        files, labels = [], []
        for label, name in enumerate(classes):
            for f in _image_files(root / name):
                files.append(f)
                labels.append(wnid_index[name] if wnid_index else label)
        if wnid_index:
            classes = list(imagenet_classes()[1])
        kind = "imagefolder"
    else:
        files, labels, classes, kind = _image_files(root), None, None, "images"
    if not files:
        raise FileNotFoundError(f"no images found under {root}")
    source = "none" if labels is None else ("imagenet_wnid" if wnid_index else "sorted_class_dirs")
    labels = labels or [-1] * len(files)
    return Records([str(f) for f in files], labels, [str(f.relative_to(root)) for f in files], classes, kind, source)


def _hf_records(root: Path) -> Records:
    import datasets

    if (root / "dataset_info.json").exists() or (root / "state.json").exists() or (root / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            split = "validation" if "validation" in ds else sorted(ds)[0]
            ds = ds[split]
        kind = "arrow"
    else:
        files = sorted(str(p) for p in root.rglob("*.parquet"))
        ds = datasets.load_dataset("parquet", data_files=files, split="train")
        kind = "parquet"
    if "image" not in ds.column_names:
        raise ValueError(f"{root}: data set has no 'image' column (columns: {ds.column_names})")
    ds = ds.cast_column("image", datasets.Image(decode=False))
    names = None
    if "label" in ds.column_names:
        feature = ds.features["label"]
        names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        labels = [int(v) for v in ds["label"]]
    else:
        labels = [-1] * len(ds)
    source = "dataset_label" if "label" in ds.column_names else "none"
    return Records(ds, labels, [f"{kind}/{i}" for i in range(len(ds))], names, kind, source)


def _is_hf(root: Path) -> bool:
    return any(root.rglob("*.parquet")) or any(root.glob("*.arrow")) or (root / "dataset_dict.json").exists() \
        or (root / "state.json").exists()


class ImageRecordDataset(Dataset):
    """Item ``i`` -> dict(index, id, label, image ``[3, S, S]`` or None, error str or None)."""

    def __init__(self, records: Records, transform: EvalTransform):
        self.records = records
        self.transform = transform

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
        return decode_image(self._raw(index))

    def __getitem__(self, index: int) -> dict:
        item = {"index": index, "id": self.records.ids[index], "label": self.records.labels[index],
                "image": None, "error": None}
        try:
            item["image"] = self.transform(self.image(index))
        except BadImage as e:
            item["error"] = str(e)
        return item


def open_dataset(path: str | os.PathLike, transform: EvalTransform | None = None) -> ImageRecordDataset:
    """Open an ImageFolder tree, a directory of images, parquet shards or an Arrow folder."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data path not found: {root}")
    transform = transform or EvalTransform()
    records = _hf_records(root) if root.is_dir() and _is_hf(root) else _folder_records(root)
    return ImageRecordDataset(records, transform)


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
