"""COCO-format detection data on local disk, and plain image lists, preprocessed as mmdet's test
pipeline (in DataLoader workers).

``CocoDetectionData(ann_file, image_dir)``: images of the annotation file in ascending id order;
label ``i`` is the ``i``-th category by ascending id (mmdet's ``cat2label``). A missing or corrupt
image file is an item with ``error`` set; it is reported, never silently dropped.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

from torch.utils.data import Dataset

from ..detection.preprocess import preprocess, read_image

COCO_SPLITS = ("val2017", "train2017", "test2017", "val2014", "train2014")


def load_coco(ann_file: str | os.PathLike):
    """``pycocotools.coco.COCO`` without its prints; clear errors for a missing or malformed file."""
    from pycocotools.coco import COCO

    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except Exception as e:  # noqa: BLE001 - json errors, missing keys
        raise ValueError(f"{path} is not a COCO annotation file: {e}") from e


def resolve_coco_paths(data: str | None, split: str, ann: str | None, images: str | None) -> tuple[Path, Path]:
    """``--data ROOT --split S`` (``ROOT/annotations/instances_S.json``, ``ROOT/S/``) or ``--ann --images``."""
    if ann or images:
        if not (ann and images):
            raise ValueError("--ann and --images go together")
        return Path(ann), Path(images)
    if not data:
        raise ValueError("give --data COCO_ROOT (with --split) or --ann FILE --images DIR")
    root = Path(data)
    ann_file, image_dir = root / "annotations" / f"instances_{split}.json", root / split
    if not ann_file.is_file():
        raise FileNotFoundError(f"{ann_file} not found (expected COCO layout ROOT/annotations/instances_{split}.json)")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} not found")
    return ann_file, image_dir


class DetectionImages(Dataset):
    """Item ``i`` -> dict(index, id, image_id, input ``[3, H, W]`` or None, meta, error)."""

    def __init__(self, files: list[Path], ids: list[str], image_ids: list[int], img_scale: tuple[int, int]):
        self.files, self.ids, self.image_ids, self.img_scale = files, ids, image_ids, img_scale

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        item = {"index": index, "id": self.ids[index], "image_id": self.image_ids[index], "input": None,
                "meta": None, "error": None}
        try:
            item["input"], item["meta"] = preprocess(read_image(self.files[index]), self.img_scale)
        except ValueError as e:
            item["error"] = str(e)
        return item


class CocoDetectionData(DetectionImages):
    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike, img_scale: tuple[int, int],
                 max_images: int | None = None):
        self.coco = load_coco(ann_file)
        self.ann_file = Path(ann_file)
        image_dir = Path(image_dir)
        if not image_dir.is_dir():
            raise FileNotFoundError(f"image folder {image_dir} not found")
        image_ids = sorted(self.coco.getImgIds())
        if max_images is not None:
            image_ids = image_ids[:max_images]
        if not image_ids:
            raise ValueError(f"{ann_file} lists no images")
        infos = self.coco.loadImgs(image_ids)
        self.cat_ids = sorted(self.coco.getCatIds())
        self.category_names = [self.coco.loadCats(c)[0]["name"] for c in self.cat_ids]
        super().__init__([image_dir / info["file_name"] for info in infos], [info["file_name"] for info in infos],
                         image_ids, img_scale)


def image_list_data(path: str | os.PathLike, img_scale: tuple[int, int]) -> DetectionImages:
    """A directory (recursively) or a single image file -> unlabelled detection items."""
    from .folder import IMAGE_SUFFIXES

    root = Path(path)
    if root.is_file():
        files, base = [root], root.parent
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        base = root
    else:
        raise FileNotFoundError(f"input not found: {root}")
    if not files:
        raise FileNotFoundError(f"no images found under {root}")
    return DetectionImages(files, [str(f.relative_to(base)) for f in files], [-1] * len(files), img_scale)


def collate_detection(items: list[dict]) -> dict:
    ok = [it for it in items if it["input"] is not None]
    return {"inputs": [it["input"] for it in ok], "metas": [it["meta"] for it in ok],
            "index": [it["index"] for it in ok], "id": [it["id"] for it in ok],
            "image_id": [it["image_id"] for it in ok],
            "failed": [(it["index"], it["id"], it["image_id"], it["error"]) for it in items if it["input"] is None],
            "all_index": [it["index"] for it in items]}


__all__ = ["CocoDetectionData", "DetectionImages", "image_list_data", "collate_detection", "load_coco",
           "resolve_coco_paths", "COCO_SPLITS"]
