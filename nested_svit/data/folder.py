"""Data sets of image records (index, source, label) on local disk, decoded robustly.

Layouts (all offline):
* ImageFolder: ``DIR/<class>/<image>`` (e.g. ImageNet ``val/<wnid>/*.JPEG``); labels are sorted class
  directory names. A flat directory of images has no labels (label -1).
* Hugging Face parquet shards (``*.parquet`` with ``image``/``label`` columns) or a ``save_to_disk``
  Arrow folder; class names from the ``label`` feature when it is a ``ClassLabel``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from .classes import imagenet_classes, imagenet_index
from .decode import BadImage, decode_image
from .transforms import EvalTransform

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm", ".pbm", ".pnm", ".avif", ".heic", ".heif", ".ico", ".jp2", ".j2k", ".tga", ".dib", ".pcx"}
# files that are certainly not images: listed as ignored (with the reason), never decoded
NON_IMAGE_SUFFIXES = {".txt", ".csv", ".json", ".jsonl", ".parquet", ".arrow", ".md", ".py", ".pth", ".pt", ".npy",
                      ".npz", ".xml", ".yaml", ".yml", ".log", ".zip", ".tar", ".gz", ".pdf", ".html", ".lock"}
@dataclass
class Records:
    sources: list  # paths (str) or a datasets.Dataset with undecoded images
    labels: list[int]
    ids: list[str]  # stable per-image identifier: relative path, or "<split>/<row>"
    class_names: list[str] | None
    kind: str
    label_source: str = "none"  # imagenet_wnid | sorted_class_dirs | dataset_label | none
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): files that get no row

    def digest(self) -> str:
        """Pins the exact input: paths, sizes and modification times of every file (or the data set's
        fingerprint); a resumed run with different files is refused."""
        h = hashlib.sha256()
        if isinstance(self.sources, list):
            for src in self.sources:
                try:
                    st = os.stat(src)
                    h.update(f"{src}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                except OSError:
                    h.update(f"{src}\0missing\n".encode())
        else:
            h.update(str(getattr(self.sources, "_fingerprint", len(self.sources))).encode())
        return h.hexdigest()


def _hidden(name: str) -> bool:
    """Hidden or tool folders (``.ipynb_checkpoints``, ``.git``, ``__MACOSX``) are never data."""
    return name.startswith(".") or name.startswith("__")


def _walk(root: Path, exclude: set[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Candidate image files under ``root`` (sorted; dangling symlinks included, so they get a row)
    and ignored files with the reason. Hidden folders/files and our own outputs are skipped."""
    files, ignored = [], []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(_hidden(part) for part in rel.parts) or any(part.endswith(".parts") for part in rel.parts[:-1]):
            continue
        if p.is_dir():
            continue
        if p.resolve() in exclude or p.name.endswith(".parts"):
            ignored.append((str(rel), "output of this run"))
            continue
        suffix = p.suffix.lower()
        if suffix in NON_IMAGE_SUFFIXES:
            ignored.append((str(rel), f"not an image ({suffix} file)"))
            continue
        files.append(p)  # known image suffixes, unknown suffixes and no suffix: Pillow decides
    return files, ignored


def _folder_records(root: Path, exclude: set[Path] = frozenset()) -> Records:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not _hidden(d.name) and not d.name.endswith(".parts"))
    files, ignored = _walk(root, set(exclude))
    if classes:
        # ImageNet wnid directories (all 1000 or a subset) get the standard ImageNet indices and names;
        # other trees get 0..K-1 in sorted order, as torchvision's ImageFolder does. Files at the top of
        # the tree (no class folder) keep a row with label -1.
        wnid_index = imagenet_index(classes)
        index = wnid_index or {name: i for i, name in enumerate(classes)}
        labels = [index[f.relative_to(root).parts[0]] if len(f.relative_to(root).parts) > 1 else -1 for f in files]
        class_names = list(imagenet_classes()[1]) if wnid_index else classes
        kind, source = "imagefolder", ("imagenet_wnid" if wnid_index else "sorted_class_dirs")
    else:
        labels, class_names, kind, source = [-1] * len(files), None, "images", "none"
    if not files:
        raise FileNotFoundError(f"no images found under {root}" + (f" ({len(ignored)} non-image files ignored)" if ignored else ""))
    return Records([str(f) for f in files], labels, [str(f.relative_to(root)) for f in files], class_names, kind,
                   source, ignored)


def _file_list_records(files: list[Path], base: Path | None, kind: str) -> Records:
    if not files:
        raise FileNotFoundError("no images matched")
    ids = [str(f.relative_to(base)) if base is not None and f.is_relative_to(base) else str(f) for f in files]
    return Records([str(f) for f in files], [-1] * len(files), ids, None, kind, "none")


def _hf_records(root: Path, split: str | None = None, exclude: set[Path] = frozenset()) -> Records:
    import datasets

    if root.is_dir() and ((root / "dataset_info.json").exists() or (root / "state.json").exists()
                          or (root / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            if split is not None and split not in ds:
                raise ValueError(f"{root}: no split {split!r}; splits: {sorted(ds)}")
            split = split or ("validation" if "validation" in ds else sorted(ds)[0])
            ds = ds[split]
        kind = "arrow"
    else:
        files = [str(root)] if root.is_file() else _hf_parquet_files(root, exclude)
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


def _hf_parquet_files(root: Path, exclude: set[Path]) -> list[str]:
    """Parquet shards of a data set folder: at the top level or under ``data/`` (the Hub layout)."""
    found = [p for p in sorted(root.glob("*.parquet")) + sorted((root / "data").rglob("*.parquet"))
             if p.resolve() not in exclude]
    return [str(p) for p in found]


def _is_hf(root: Path, exclude: set[Path] = frozenset()) -> bool:
    """Decided at the top level only: a stray .parquet deep in an image tree is not a data set."""
    return bool(_hf_parquet_files(root, set(exclude))) or any(root.glob("*.arrow")) \
        or (root / "dataset_dict.json").exists() or (root / "state.json").exists()


class ImageRecordDataset(Dataset):
    """Item ``i`` -> dict(index, id, label, image ``[3, S, S]`` or None, error str or None)."""

    def __init__(self, records: Records, transform: EvalTransform, exif: bool = False, max_pixels: int | None = None):
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
        if isinstance(raw, str) and os.path.islink(raw) and not os.path.exists(raw):
            raise BadImage(f"broken symbolic link to {os.readlink(raw)}")
        return decode_image(raw, self.max_pixels, self.exif)

    def __getitem__(self, index: int) -> dict:
        item = {"index": index, "id": self.records.ids[index], "label": self.records.labels[index],
                "image": None, "error": None}
        try:
            item["image"] = self.transform(self.image(index))
        except BadImage as e:
            item["error"] = str(e)
        return item


def open_dataset(path: str | os.PathLike, transform: EvalTransform | None = None, split: str | None = None,
                 exclude: list[str | os.PathLike] = (), exif: bool = False, max_pixels: int | None = None,
                 ) -> ImageRecordDataset:
    """Open an input: an ImageFolder tree or a directory of images, parquet shards or a ``save_to_disk``
    folder, a single image file, a single ``.parquet`` file, a text file listing image paths (one per
    line, relative to the list's folder), or a glob pattern (``'photos/*.jpg'``). ``exclude``: our own
    output files, never read back as input."""
    transform = transform or EvalTransform()
    excluded = {Path(p).resolve() for p in exclude}
    text = str(path)
    if any(ch in text for ch in "*?[") and not Path(text).exists():
        import glob

        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if not Path(p).is_dir())
        if not files:
            raise FileNotFoundError(f"no files match {text}")
        return ImageRecordDataset(_file_list_records(files, None, "glob"), transform, exif, max_pixels)
    root = Path(path)
    if not root.exists() and not root.is_symlink():
        raise FileNotFoundError(f"data path not found: {root}")
    if root.is_file():
        suffix = root.suffix.lower()
        if suffix == ".parquet":
            records = _hf_records(root, split)
        elif suffix in (".txt", ".lst"):
            lines = [ln.strip() for ln in root.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
            files = [(root.parent / ln) if not Path(ln).is_absolute() else Path(ln) for ln in lines]
            records = _file_list_records(files, root.parent, "list")
        else:
            records = _file_list_records([root], root.parent, "image")
    elif _is_hf(root, excluded):
        records = _hf_records(root, split, excluded)
    else:
        records = _folder_records(root, excluded)
    return ImageRecordDataset(records, transform, exif, max_pixels)


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
