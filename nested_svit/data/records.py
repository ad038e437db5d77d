"""The one input resolver, for classifiers and detectors alike: a path, glob or list -> ``Records``
(index, source, label, id), with the files that get no row listed with the reason.

Inputs (all offline):
* ImageFolder: ``DIR/<class>/<image>`` (e.g. ImageNet ``val/<wnid>/*.JPEG``); labels are sorted class
  directory names (ImageNet wnids get ImageNet's indices). A flat directory of images has no labels
  (label -1); so has a file at the top of a class tree.
* Hugging Face parquet shards (``*.parquet`` with ``image``/``label`` columns), one ``.parquet`` file,
  or a ``save_to_disk`` Arrow folder; class names from the ``label`` feature when it is a ``ClassLabel``.
* Object storage (``data/objectstore.py``): a prefix (``s3://bucket/val/``) or a quoted glob
  (``'s3://bucket/val/*/*.JPEG'``), under a folder's rules; the ids are the URIs.
* One image file, a ``.txt`` / ``.lst`` list of paths (one per line, relative to the list's folder;
  ``#`` comments), or a quoted glob (``'photos/*.jpg'``).
Rules everywhere: hidden and tool folders (``.git``, ``__MACOSX``) are never data; our own outputs are
never read back: this run's (``exclude``) and any earlier run's, which we mark (a marker file in picture
and part folders, schema metadata in parquet files), listed as ignored; a folder of images that also holds
a stray parquet file is still a folder of images. Every other file gets a row (undecodable ones are skipped
with the reason) or is listed in ``ignored`` with the reason (known non-image suffixes).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .classes import imagenet_classes, imagenet_index, wnids_in_names
from .hf_ids import row_ids
from .manifest import manifest_column, read_manifest
from .objectstore import is_uri, list_objects

# what our outputs carry, so no later run reads them back as input (``data/records.py``): a marker file in
# picture folders (--save-vis) and part folders (<out>.parts), a schema metadata key in parquet outputs
PICTURES_MARKER = ".nested-svit-pictures"
PARTS_MARKER = ".nested-svit-parts"
DATASET_MARKER = ".nested-svit-dataset"  # a folder --out that is a partitioned Parquet data set of rows
PARQUET_KEY = b"nested_svit"
MARKERS = {PICTURES_MARKER: "pictures of an earlier nested-svit run (--save-vis)",
           PARTS_MARKER: "part files of an unfinished nested-svit run",
           DATASET_MARKER: "a Parquet data set written by nested-svit predict"}


def mark_output_folder(folder: str | os.PathLike, marker: str) -> None:
    """Mark ``folder`` (created if needed) as ours: one of ``MARKERS``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / marker).touch()


def output_kind(folder: Path) -> str | None:
    """Why ``folder`` is an output of ours (``MARKERS``' reason), else None."""
    for marker, why in MARKERS.items():
        if (folder / marker).exists():
            return why
    return None


def is_our_file(path: Path) -> bool:
    """An output file of ours: a parquet file carrying ``PARQUET_KEY``, or a ``<out>.meta.json`` sidecar."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return is_our_parquet(path)
    if name.endswith(".meta.json"):
        try:
            import json

            return "nested_svit_version" in json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            return False
    return False


def is_our_parquet(path: Path) -> bool:
    """Whether a parquet file is an output of ours (its schema metadata carries ``PARQUET_KEY``)."""
    try:
        import pyarrow.parquet as pq

        return PARQUET_KEY in (pq.read_schema(path).metadata or {})
    except Exception:  # noqa: BLE001 - not readable as parquet: not ours (the reader says why, if it is read)
        return False

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm", ".pbm", ".pnm", ".avif", ".heic", ".heif", ".ico", ".jp2", ".j2k", ".tga", ".dib", ".pcx"}
# files that are certainly not images: listed as ignored (with the reason), never decoded
NON_IMAGE_SUFFIXES = {".txt", ".csv", ".json", ".jsonl", ".parquet", ".arrow", ".md", ".py", ".pth", ".pt", ".npy",
                      ".npz", ".xml", ".yaml", ".yml", ".log", ".zip", ".tar", ".gz", ".pdf", ".html", ".lock"}


@dataclass
class Records:
    """Image ``i``: ``sources[i]`` (a path, or row ``i`` of a ``datasets.Dataset`` of undecoded images),
    ``labels[i]`` (-1: none), ``ids[i]``; ``image_ids[i]`` for COCO-format sets."""

    sources: list  # paths (str) or a datasets.Dataset with undecoded images
    labels: list[int]
    ids: list[str]  # stable per-image identifier: relative path, or "<split>/<row>"
    class_names: list[str] | None
    kind: str
    label_source: str = "none"  # imagenet_wnid | imagenet_wnid_in_name | sorted_class_dirs | folder_index |
    # model_class_names | dataset_label | none
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): files that get no row
    image_ids: list[int] | None = None  # COCO image ids
    keys: list[str] | None = None  # object store inputs: each key below the listed prefix (``<class>/<image>``)
    stamps: list[str] | None = None  # object store inputs: each object's size and ETag (what ``digest`` pins)

    def __len__(self) -> int:
        return len(self.labels)

    def digest(self) -> str:
        """Pins the exact input: paths, sizes and modification times of every file (or the data set's
        fingerprint); a resumed run with different files is refused."""
        h = hashlib.sha256()
        if self.stamps is not None:
            for src, stamp in zip(self.sources, self.stamps):
                h.update(f"{src}\0{stamp}\n".encode())
        elif isinstance(self.sources, list):
            for src in self.sources:
                try:
                    st = os.stat(src)
                    h.update(f"{src}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                except OSError:
                    h.update(f"{src}\0missing\n".encode())
        else:
            h.update(str(getattr(self.sources, "_fingerprint", len(self.sources))).encode())
        return h.hexdigest()


def content_digest(records: "Records") -> str:
    """Pins what a training run learns from, wherever the files sit: each record's id, label and file
    size (or the data set's fingerprint), in order; unchanged by copying the data elsewhere."""
    h = hashlib.sha256()
    if isinstance(records.sources, list):
        for i, (src, image_id, label) in enumerate(zip(records.sources, records.ids, records.labels)):
            try:
                size = records.stamps[i].split(":")[0] if records.stamps is not None else os.stat(src).st_size
            except OSError:
                size = -1
            h.update(f"{image_id}\0{label}\0{size}\n".encode())
    else:
        h.update(str(getattr(records.sources, "_fingerprint", len(records.sources))).encode())
        h.update(str(records.labels).encode())
    return h.hexdigest()


def _hidden(name: str) -> bool:
    """Hidden or tool folders (``.ipynb_checkpoints``, ``.git``, ``__MACOSX``) are never data."""
    return name.startswith(".") or name.startswith("__")


def _is_output(p: Path, exclude: set[Path]) -> bool:
    """``p`` is one of our outputs (``exclude``: files, or folders such as ``--save-vis``) or inside one."""
    resolved = p.resolve()
    return resolved in exclude or any(parent in exclude for parent in resolved.parents)


def _walk(root: Path, exclude: set[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Candidate image files under ``root`` (sorted; dangling symlinks included, so they get a row)
    and ignored files with the reason. Hidden folders/files are skipped; our own outputs (this run's,
    and earlier runs' marked folders and parquet files) are listed as ignored."""
    files, ignored = [], []
    marked: dict[Path, str | None] = {}

    def earlier_output(rel: Path) -> str | None:
        for depth in range(1, len(rel.parts)):
            folder = root.joinpath(*rel.parts[:depth])
            if folder not in marked:
                marked[folder] = output_kind(folder)
            if marked[folder]:
                return marked[folder]
        return None

    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(_hidden(part) for part in rel.parts) or p.is_dir():
            continue
        if _is_output(p, exclude):
            ignored.append((str(rel), "output of this run"))
            continue
        why = earlier_output(rel) or ("output of an earlier nested-svit run" if is_our_file(p) else None)
        if why:
            ignored.append((str(rel), why))
            continue
        suffix = p.suffix.lower()
        if suffix in NON_IMAGE_SUFFIXES:
            ignored.append((str(rel), f"not an image ({suffix} file)"))
            continue
        files.append(p)  # known image suffixes, unknown suffixes and no suffix: Pillow decides
    return files, ignored


def _folder_records(root: Path, exclude: set[Path] = frozenset()) -> Records:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not _hidden(d.name) and not output_kind(d)
                     and not _is_output(d, exclude))
    files, ignored = _walk(root, set(exclude))
    if not files:
        raise FileNotFoundError(f"no images found under {root}" + (f" ({len(ignored)} non-image files ignored)" if ignored else ""))
    labels, class_names, kind, source = _tree_labels([f.relative_to(root).parts for f in files], classes)
    return Records([str(f) for f in files], labels, [str(f.relative_to(root)) for f in files], class_names, kind,
                   source, ignored)


def _tree_labels(parts: list[tuple[str, ...]], classes: list[str]) -> tuple[list[int], list[str] | None, str, str]:
    """Labels of a tree's files (each file's path parts below the root) from its class folders ->
    (labels, class names, kind, label source). ImageNet wnid folders (all 1000 or a subset) get ImageNet's
    indices and names; other trees get 0..K-1 in sorted order, as torchvision's ImageFolder does. Files
    at the top of the tree (no class folder) get -1."""
    if not classes:
        named = wnids_in_names([p[-1] for p in parts])
        if named is not None:  # Hugging Face's flat ImageNet val: ILSVRC2012_val_00000001_n01440764.JPEG
            return named, list(imagenet_classes()[1]), "images", "imagenet_wnid_in_name"
        return [-1] * len(parts), None, "images", "none"
    wnid_index = imagenet_index(classes)
    index = wnid_index or {name: i for i, name in enumerate(classes)}
    labels = [index[p[0]] if len(p) > 1 else -1 for p in parts]
    class_names = list(imagenet_classes()[1]) if wnid_index else classes
    return labels, class_names, "imagefolder", ("imagenet_wnid" if wnid_index else "sorted_class_dirs")


def _uri_records(uri: str) -> Records:
    """An object store prefix or glob (``objectstore.list_objects``: no image read), under a folder's
    rules: class folders from each key's first folder, hidden keys skipped, known non-image files and
    our own outputs (folders holding one of our markers) listed as ignored. Ids are the URIs."""
    objects = [o for o in list_objects(uri) if not any(_hidden(part) for part in o.key.split("/")[:-1])]
    ours = {o.key.rsplit("/", 1)[0] for o in objects if o.key.rsplit("/", 1)[-1] in MARKERS}
    kept, ignored = [], []
    for o in objects:
        name = o.key.rsplit("/", 1)[-1]
        suffix = Path(name).suffix.lower()
        if any(o.key.startswith(folder + "/") for folder in ours):
            ignored.append((o.uri, "output of an earlier nested-svit run"))
        elif _hidden(name):
            continue
        elif suffix in NON_IMAGE_SUFFIXES:
            ignored.append((o.uri, f"not an image ({suffix} file)"))
        else:
            kept.append(o)
    earlier = {u for u, why in ignored if why == "output of an earlier nested-svit run"}
    shards = [o.uri for o in objects if o.key.endswith(".parquet") and o.uri not in earlier]
    if not kept and shards:  # Hugging Face parquet shards (datasets reads them through the same fsspec layer)
        return _hf_records(uri, files=shards)
    if not kept:
        raise FileNotFoundError(f"no images found under {uri}" + (f" ({len(ignored)} other objects ignored)" if ignored else ""))
    parts = [tuple(o.key.split("/")) for o in kept]
    labels, class_names, kind, source = _tree_labels(parts, sorted({p[0] for p in parts if len(p) > 1}))
    uris = [o.uri for o in kept]
    return Records(uris, labels, list(uris), class_names, kind, source, ignored, keys=[o.key for o in kept],
                   stamps=[o.stamp for o in kept])


def _file_list_records(files: list[Path], base: Path | None, kind: str) -> Records:
    if not files:
        raise FileNotFoundError("no images matched")
    ids = [str(f.relative_to(base)) if base is not None and f.is_relative_to(base) else str(f) for f in files]
    return Records([str(f) for f in files], [-1] * len(files), ids, None, kind, "none")


def _hf_records(root: Path | str, split: str | None = None, exclude: set[Path] = frozenset(),
                files: list[str] | None = None) -> Records:
    """A save_to_disk folder or parquet shards: ``root``'s, or ``files`` (shards in object storage)."""
    import datasets

    if files is None and root.is_dir() and ((root / "dataset_info.json").exists() or (root / "state.json").exists()
                          or (root / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            if split is not None and split not in ds:
                raise ValueError(f"{root}: no split {split!r}; splits: {sorted(ds)}")
            split = split or ("validation" if "validation" in ds else sorted(ds)[0])
            ds = ds[split]
        kind = "arrow"
    else:
        files = files or ([str(root)] if root.is_file() else _hf_parquet_files(root, exclude))
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
    return Records(ds, labels, row_ids(ds, kind, files if kind == "parquet" else None), names, kind, source)


def _hf_parquet_files(root: Path, exclude: set[Path]) -> list[str]:
    """Parquet shards of a data set folder: at the top level or under ``data/`` (the Hub layout); never
    our own outputs (this run's, or an earlier run's by their metadata)."""
    found = [p for p in sorted(root.glob("*.parquet")) + sorted((root / "data").rglob("*.parquet"))
             if p.resolve() not in exclude and not is_our_parquet(p)]
    return [str(p) for p in found]


def _holds_images(root: Path) -> bool:
    """Whether the top level of ``root`` holds image files or folders other than a Hub ``data/`` folder."""
    for p in root.iterdir():
        if _hidden(p.name) or (p.is_dir() and (p.name == "data" or output_kind(p))):
            continue
        if p.is_dir() or p.suffix.lower() not in NON_IMAGE_SUFFIXES:
            return True
    return False


def _is_hf(root: Path, exclude: set[Path] = frozenset()) -> bool:
    """Decided at the top level only: a folder whose top holds parquet shards (not ours) or Arrow files and
    no images or class folders is a data set; a folder of images with a stray .parquet is a folder of
    images (the parquet file is listed as ignored)."""
    if (root / "dataset_dict.json").exists() or (root / "state.json").exists():
        return True
    return (bool(_hf_parquet_files(root, set(exclude))) or any(root.glob("*.arrow"))) and not _holds_images(root)


def _glob_records(pattern: str, exclude: set[Path]) -> Records:
    """A quoted glob: matches under the same rules as a folder walk (hidden and tool folders, our
    outputs and known non-image files are not rows; the latter two are listed as ignored)."""
    import glob

    files, ignored = [], []
    for p in sorted(Path(m) for m in glob.glob(pattern, recursive=True)):
        if p.is_dir() or any(_hidden(part) for part in p.parts if part not in (".", "..")):
            continue
        if _is_output(p, exclude):
            ignored.append((str(p), "output of this run"))
        elif any(output_kind(parent) for parent in p.parents) or is_our_file(p):
            ignored.append((str(p), "output of an earlier nested-svit run"))
        elif p.suffix.lower() in NON_IMAGE_SUFFIXES:
            ignored.append((str(p), f"not an image ({p.suffix.lower()} file)"))
        else:
            files.append(p)
    if not files:
        raise FileNotFoundError(f"no images match {pattern}" + (f" ({len(ignored)} other files ignored)" if ignored else ""))
    records = _file_list_records(files, None, "glob")
    records.ignored = ignored
    return records


def _list_records(listing: Path) -> Records:
    """A ``.txt`` / ``.lst`` file of image paths, one per line (relative to its folder; ``#`` comments).
    Every listed path gets a row: one that is missing or no image is skipped with the reason."""
    lines = [ln.strip() for ln in listing.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not lines:
        raise FileNotFoundError(f"{listing} lists no image paths")
    files = [(listing.parent / ln) if not Path(ln).is_absolute() else Path(ln) for ln in lines]
    return _file_list_records(files, listing.parent, "list")


def _manifest_records(path: str, column: str) -> Records:
    """A manifest (``data/manifest.py``): every row gets a row, a missing object or file skipped with the reason."""
    rows = read_manifest(path, column)
    return Records(rows.sources, rows.labels, rows.ids, None, "manifest", rows.label_source,
                   stamps=["listed"] * len(rows.sources) if any(map(is_uri, rows.sources)) else None)


def resolve_records(path: str | os.PathLike, split: str | None = None, exclude: Iterable[str | os.PathLike] = (),
                    uri_column: str | None = None) -> Records:
    """Any input of the module docstring -> ``Records``. ``exclude``: our own output files, never
    read back as input; ``split``: of a ``save_to_disk`` ``DatasetDict`` (default validation, else the first)."""
    text = str(path)
    if (is_uri(text) or Path(text).is_file()) and (column := manifest_column(text, uri_column)):
        return _manifest_records(text, column)
    if uri_column:
        raise ValueError(f"--uri-column names a column of a .csv or .parquet manifest; {text} is not one")
    if is_uri(text):
        return _uri_records(text)
    excluded = {Path(p).resolve() for p in exclude}
    if any(ch in text for ch in "*?[") and not Path(text).exists():
        return _glob_records(text, excluded)
    root = Path(path)
    if not root.exists() and not root.is_symlink():
        raise FileNotFoundError(f"data path not found: {root}")
    if root.is_file() or root.is_symlink() and not root.exists():
        suffix = root.suffix.lower()
        if suffix == ".parquet":
            return _hf_records(root, split)
        if suffix in (".txt", ".lst"):
            return _list_records(root)
        return _file_list_records([root], root.parent, "image")
    if _is_hf(root, excluded):
        return _hf_records(root, split, excluded)
    return _folder_records(root, excluded)
