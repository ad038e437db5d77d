"""A small COCO-format data set written by the tests: coloured shapes on noise, of several sizes and
aspect ratios, with boxes and polygon masks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(120, 160), (160, 120), (96, 200), (120, 160), (140, 140)]
CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "bar"}]  # non-contiguous ids on purpose


def make_coco(root: Path, sizes=SIZES, seed: int = 0, corrupt: int | None = None, missing: int | None = None) -> tuple[Path, Path]:
    """-> (annotation json, image folder). Image ``corrupt`` is written as garbage bytes; image
    ``missing`` is listed but not written."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, (h, w) in enumerate(sizes):
        name = f"img{i:03d}.png"
        pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        for k in range(2):
            bw, bh = int(rng.integers(16, w // 2)), int(rng.integers(16, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            cat = CATEGORIES[k % 2]
            pixels[y:y + bh, x:x + bw] = (200, 50 + 100 * k, 30)
            poly = [x, y, x + bw, y, x + bw, y + bh, x, y + bh]
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": cat["id"], "bbox": [x, y, bw, bh],
                         "area": float(bw * bh), "iscrowd": 0, "segmentation": [poly]})
        images.append({"id": 100 + i, "file_name": name, "height": h, "width": w})
        if i == corrupt:
            (img_dir / name).write_bytes(b"not an image at all")
        elif i != missing:
            Image.fromarray(pixels).save(img_dir / name)
    ann = root / "annotations.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return ann, img_dir
