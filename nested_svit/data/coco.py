"""COCO-format detection data on local disk, and any other input as detector items, preprocessed as
mmdet's test pipeline (in DataLoader workers).

``CocoDetectionData(ann_file, image_dir)``: images of the annotation file in ascending id order;
label ``i`` is the ``i``-th category by ascending id (mmdet's ``cat2label``). ``DetectionImages(records,
img_scale)``: any input of ``records.resolve_records``. A missing or corrupt image file is an item with
``error`` set; it is reported, never silently dropped.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..seeding import item_generator
from .dataset import ImageRecordDataset
from .det_transforms import DetectorTransform, normalize_pad, read_image
from .records import Records

COCO_SPLITS = ("val2017", "train2017", "test2017", "val2014", "train2014")


def load_coco(ann_file: str | os.PathLike):
    """``pycocotools.coco.COCO`` without its prints; clear errors for a missing or malformed file, an
    image id listed twice (pycocotools would merge the two images' ground truth) and no categories."""
    import json

    from pycocotools.coco import COCO

    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a COCO annotation file: not JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path} is not a COCO annotation file: no 'images' list")
    seen: dict = {}
    for info in data["images"]:
        if not isinstance(info, dict) or "id" not in info or "file_name" not in info:
            raise ValueError(f"{path}: an image entry without 'id' and 'file_name': {str(info)[:80]}")
        if info["id"] in seen:
            raise ValueError(f"{path}: image id {info['id']} is listed twice ({seen[info['id']]} and {info['file_name']}); "
                             "ids must be unique, or the two images' ground truth is merged")
        seen[info["id"]] = info["file_name"]
    if not data.get("categories"):
        raise ValueError(f"{path} lists no categories: a detector needs at least one class")
    data.setdefault("annotations", [])
    coco = COCO()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.dataset = data
            coco.createIndex()
    except Exception as e:  # noqa: BLE001 - missing keys in annotations or categories
        raise ValueError(f"{path} is not a COCO annotation file: {type(e).__name__} {e}") from e
    return coco


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


def coco_records(coco, image_dir: Path, max_images: int | None = None) -> Records:
    """The images of a loaded annotation file, by ascending id (the first ``max_images``)."""
    image_ids = sorted(coco.getImgIds())
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"--max-images must be >= 1, got {max_images}")
        image_ids = image_ids[:max_images]
    infos = coco.loadImgs(image_ids)
    names = [info["file_name"] for info in infos]
    return Records([str(image_dir / n) for n in names], [-1] * len(names), names, None, "coco", "none",
                   image_ids=list(image_ids))


class DetectionImages(ImageRecordDataset):
    """Item ``i`` -> dict(index, id, image_id, input ``[3, H, W]`` or None, meta, error): record ``i``
    decoded (EXIF orientation applied, as mmdet) and run through the detectors' test pipeline."""

    def __init__(self, records: Records, img_scale: tuple[int, int], exif: bool = True, max_pixels: int | None = None):
        super().__init__(records, DetectorTransform(tuple(img_scale)), exif, max_pixels)
        self.img_scale = tuple(img_scale)

    @property
    def ids(self) -> list[str]:
        return self.records.ids

    @staticmethod
    def collate(items: list[dict]) -> dict:
        """The loader's ``collate_fn`` for these items (``collate_detection``)."""
        return collate_detection(items)

    @property
    def image_ids(self) -> list[int]:
        return self.records.image_ids or [-1] * len(self.records)

    def decoded(self, index: int):
        """Image ``index`` as the detector reads it: RGB uint8 ``[H, W, 3]`` (raises ``BadImage``)."""
        import numpy as np

        return np.ascontiguousarray(np.asarray(self.image(index)))

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        pair = item.pop("image")
        item["input"], item["meta"] = pair if pair is not None else (None, None)
        item["image_id"] = self.image_ids[index]
        return item


class CocoDetectionData(DetectionImages):
    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike, img_scale: tuple[int, int],
                 max_images: int | None = None, max_pixels: int | None = None):
        self.coco = load_coco(ann_file)
        self.ann_file = Path(ann_file)
        image_dir = Path(image_dir)
        if not image_dir.is_dir():
            raise FileNotFoundError(f"image folder {image_dir} not found")
        records = coco_records(self.coco, image_dir, max_images)
        if not records.ids:
            raise ValueError(f"{ann_file} lists no images")
        self.cat_ids = sorted(self.coco.getCatIds())
        self.category_names = [self.coco.loadCats(c)[0]["name"] for c in self.cat_ids]
        super().__init__(records, img_scale, max_pixels=max_pixels)


def collate_detection(items: list[dict]) -> dict:
    """Batch of items -> dict of lists; the inputs (each its own padded size) flattened into one tensor,
    ``packed``, so the batch is pinned and uploaded in one copy (``upload_detection_batch``)."""
    ok = [it for it in items if it["input"] is not None]
    inputs = [it["input"] for it in ok]
    return {"packed": torch.cat([t.reshape(-1) for t in inputs]) if inputs else None,
            "shapes": [tuple(t.shape) for t in inputs], "metas": [it["meta"] for it in ok],
            "index": [it["index"] for it in ok], "id": [it["id"] for it in ok],
            "image_id": [it["image_id"] for it in ok],
            "failed": [(it["index"], it["id"], it["image_id"], it["error"]) for it in items if it["input"] is None],
            "all_index": [it["index"] for it in items]}


def upload_detection_batch(batch: dict, device: torch.device | str) -> dict:
    """``collate_detection``'s batch with ``inputs``: views ``[3, H_pad, W_pad]`` of one upload to ``device``."""
    packed = batch.pop("packed")
    flat = packed.to(device, non_blocking=True) if packed is not None else None
    sizes = [math.prod(s) for s in batch["shapes"]]
    batch["inputs"] = [v.view(s) for v, s in zip(flat.split(sizes), batch["shapes"])] if flat is not None else []
    return batch


class CocoTrainData(Dataset):
    """mmdet's training pipeline on a COCO-format set: images without usable annotations are left out
    (``filter_empty_gt``); crowd boxes and boxes under 1 px are dropped (the Mask R-CNN config ignores
    crowd regions); horizontal flip with probability ``flip``, then either a keep-ratio resize to
    ``img_scale`` or, with ``multiscale=True``, the official multi-scale + crop policy
    (``det_augment.multiscale_crop``); normalise, pad to /32. Every draw comes from a generator seeded
    by (seed, epoch, index). Item ``i`` -> ``(input [3, H, W], target)`` with ``boxes``, ``labels``,
    ``masks`` and ``img_shape`` in padded-input pixels (a crop may leave no instance); an unreadable
    image gives ``(None, reason)``."""

    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike, img_scale: tuple[int, int],
                 flip: float = 0.5, seed: int = 0, multiscale: bool = False):
        self.coco = load_coco(ann_file)
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder {image_dir} not found")
        self.cat_ids = sorted(self.coco.getCatIds())
        self.category_names = [self.coco.loadCats(c)[0]["name"] for c in self.cat_ids]
        self.cat2label = {c: i for i, c in enumerate(self.cat_ids)}
        self.img_scale, self.flip, self.seed, self.epoch = img_scale, flip, seed, 0
        self.multiscale = multiscale
        self.image_ids = [i for i in sorted(self.coco.getImgIds()) if self._annotations(i)[0].shape[0]]
        self.left_out = len(self.coco.getImgIds()) - len(self.image_ids)
        if not self.image_ids:
            raise ValueError(f"{ann_file}: no image has a usable (non-crowd, >= 1 px) annotation")

    def __len__(self) -> int:
        return len(self.image_ids)

    def digest(self) -> str:
        """Pins what training learns from: the annotations (the file's bytes) and each used image's name
        and file size; unchanged by copying the data elsewhere."""
        import hashlib

        h = hashlib.sha256(Path(self.ann_file).read_bytes())
        for info in self.coco.loadImgs(self.image_ids):
            path = self.image_dir / info["file_name"]
            h.update(f"{info['file_name']}\0{path.stat().st_size if path.exists() else -1}\n".encode())
        return h.hexdigest()

    def _annotations(self, image_id: int):
        import numpy as np

        boxes, labels, anns = [], [], []
        info = self.coco.loadImgs(image_id)[0]
        for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id])):
            x, y, w, h = a["bbox"]
            inter_w = max(0, min(x + w, info["width"]) - max(x, 0))
            inter_h = max(0, min(y + h, info["height"]) - max(y, 0))
            if a.get("ignore", False) or a.get("iscrowd", 0) or inter_w * inter_h == 0 or a.get("area", w * h) <= 0 \
                    or w < 1 or h < 1 or a["category_id"] not in self.cat2label:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.cat2label[a["category_id"]])
            anns.append(a)
        return np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(labels, dtype=np.int64), anns

    def instances(self, index: int):
        """Image ``index`` at its original size with its usable instances (``det_augment.Instances``)."""
        import warnings

        import numpy as np

        from .det_augment import Instances

        image_id = self.image_ids[index]
        info = self.coco.loadImgs(image_id)[0]
        rgb = read_image(self.image_dir / info["file_name"])
        expected = (info.get("height", rgb.shape[0]), info.get("width", rgb.shape[1]))
        if tuple(rgb.shape[:2]) != tuple(expected):  # e.g. an EXIF orientation: boxes would be in another frame
            raise ValueError(f"{info['file_name']} decodes to {rgb.shape[1]}x{rgb.shape[0]} (EXIF orientation applied, "
                             f"as mmdet) but the annotations are for {expected[1]}x{expected[0]}: left out of training")
        boxes, labels, anns = self._annotations(image_id)
        masks = np.zeros((len(anns), rgb.shape[0], rgb.shape[1]), dtype=bool)
        for k, a in enumerate(anns):
            with warnings.catch_warnings():  # pycocotools' numpy-2 copy-keyword deprecation
                warnings.simplefilter("ignore", DeprecationWarning)
                m = self.coco.annToMask(a)
            masks[k, :m.shape[0], :m.shape[1]] = m[:rgb.shape[0], :rgb.shape[1]] > 0
        return Instances(rgb, boxes, labels, masks)

    def __getitem__(self, index: int):
        import numpy as np
        import torch

        from .det_augment import hflip, multiscale_crop, resize

        try:
            x = self.instances(index)
        except ValueError as e:
            return None, str(e)
        gen = item_generator(self.seed, self.epoch, index)
        flip = bool(torch.rand((), generator=gen) < self.flip)
        if flip:
            x = hflip(x)
        x = multiscale_crop(x, gen) if self.multiscale else resize(x, self.img_scale)
        tensor = normalize_pad(x.image)
        h, w = x.size
        masks = np.zeros((len(x.masks), tensor.shape[1], tensor.shape[2]), dtype=bool)
        masks[:, :h, :w] = x.masks
        target = {"boxes": torch.from_numpy(x.boxes), "labels": torch.from_numpy(x.labels),
                  "masks": torch.from_numpy(masks), "img_shape": (h, w), "image_id": self.image_ids[index],
                  "flip": flip}
        return tensor, target


def collate_train(items: list) -> tuple[list, list, int]:
    """-> (inputs, targets, number of unreadable images left out of the batch)."""
    ok = [(x, t) for x, t in items if x is not None]
    return [x for x, _ in ok], [t for _, t in ok], len(items) - len(ok)


__all__ = ["CocoDetectionData", "DetectionImages", "coco_records", "collate_detection", "upload_detection_batch",
           "load_coco", "resolve_coco_paths", "COCO_SPLITS", "CocoTrainData", "collate_train"]
