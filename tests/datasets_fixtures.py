"""Small real image data sets written by the tests: ImageFolder, parquet shards, Arrow folder."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

WNIDS = ["n01440764", "n01443537", "n01484850"]  # ImageNet classes 0, 1, 2


def make_image(rng: np.random.Generator, mode: str = "RGB", size: tuple[int, int] = (80, 60)) -> Image.Image:
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_image_folder(root: Path, per_class: int = 4, seed: int = 0) -> list[tuple[str, int]]:
    """``root/<wnid>/*.{JPEG,png}`` -> [(relative path, ImageNet label)]."""
    rng = np.random.default_rng(seed)
    items = []
    for label, wnid in enumerate(WNIDS):
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            fmt, suffix = ("JPEG", "JPEG") if i % 2 == 0 else ("PNG", "png")
            rel = f"{wnid}/img{i}.{suffix}"
            (root / rel).write_bytes(encode(make_image(rng, size=(70 + 7 * i, 50 + 5 * label)), fmt))
            items.append((rel, label))
    return sorted(items)


def write_parquet(root: Path, n: int = 10, shards: int = 2, seed: int = 1) -> list[tuple[bytes, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    records = [(encode(make_image(rng), "JPEG" if i % 3 else "PNG"), int(rng.integers(0, 10))) for i in range(n)]
    root.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    per = (n + shards - 1) // shards
    for s in range(shards):
        part = records[s * per:(s + 1) * per]
        table = pa.table({"image": pa.array([{"bytes": b, "path": None} for b, _ in part], type=image_type),
                          "label": pa.array([lab for _, lab in part], type=pa.int64())})
        pq.write_table(table, root / f"validation-{s:05d}-of-{shards:05d}.parquet")
    return records


def write_arrow(root: Path, n: int = 6, seed: int = 2) -> list[tuple[bytes, int]]:
    import datasets

    rng = np.random.default_rng(seed)
    records = [(encode(make_image(rng), "PNG"), i % 3) for i in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "fox"])})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b, _ in records],
                                     "label": [lab for _, lab in records]}, features=features)
    ds.save_to_disk(str(root))
    return records


def smooth_image(rng: np.random.Generator, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A photo-like image (smooth colour fields + grain): JPEG artefacts and resampling behave as on photos."""
    low = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    arr = np.asarray(low).astype(np.int16) + rng.integers(-12, 13, size=(size[1], size[0], 3))
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")
    return img.convert(mode) if mode != "RGB" else img


def write_awkward_folder(root: Path, seed: int = 7) -> dict[str, str]:
    """A flat folder of the files users have: baseline, progressive, grayscale, CMYK and EXIF-rotated
    JPEGs, PNG (8- and 16-bit, RGBA), a tiny image, a truncated and a corrupt JPEG, a non-image file with
    an image suffix, a text file, names with spaces and unicode. -> {file name: what it is}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, str] = {}

    def save(name: str, what: str, img: Image.Image, **kw) -> None:
        img.save(root / name, **kw)
        kinds[name] = what

    save("photo.jpg", "jpeg", smooth_image(rng, (120, 90)), quality=92)
    save("wide photo é.jpg", "jpeg", smooth_image(rng, (200, 70)), quality=85)
    save("progressive.jpg", "progressive jpeg", smooth_image(rng, (96, 128)), progressive=True, quality=90)
    save("gray.jpg", "grayscale jpeg", smooth_image(rng, (100, 80), "L"))
    save("cmyk.jpg", "cmyk jpeg", smooth_image(rng, (90, 90), "CMYK"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    save("rotated.jpg", "exif-rotated jpeg", smooth_image(rng, (110, 70)), exif=exif)
    save("tiny.jpg", "tiny jpeg", smooth_image(rng, (3, 2)))
    save("graph.png", "png", smooth_image(rng, (64, 64)))
    save("alpha.png", "rgba png", smooth_image(rng, (50, 70), "RGBA"))
    deep = (np.asarray(smooth_image(rng, (60, 40), "L")).astype(np.uint16) * 257)
    save("deep.png", "16-bit png", Image.fromarray(deep))
    full = (root / "photo.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    kinds["truncated.jpg"] = "truncated jpeg"
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg \xff\xd9")
    kinds["corrupt.jpg"] = "corrupt jpeg"
    (root / "document.jpg").write_bytes(b"%PDF-1.4 a document saved with the wrong suffix")
    kinds["document.jpg"] = "not an image"
    (root / "notes.txt").write_text("not data")
    kinds["notes.txt"] = "text file (ignored)"
    return kinds


def compare_rows(local: pd.DataFrame, remote: pd.DataFrame) -> None:
    """Two runs' prediction rows: the same columns and values, probabilities within 1e-5."""
    assert list(local.columns) == list(remote.columns)
    exact = [c for c in local.columns if not c.endswith("_prob")]
    pd.testing.assert_frame_equal(local[exact], remote[exact])
    probs = [c for c in local.columns if c.endswith("_prob")]
    np.testing.assert_allclose(local[probs].to_numpy(float), remote[probs].to_numpy(float), atol=1e-5, rtol=0)
