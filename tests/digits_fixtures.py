"""The bundled digits model and images as test inputs: the 32-px digits SViT (a plain state dict), its
sample folders (one per digit, two PNGs each), and the reference they are scored against (the model run
on each image by itself)."""
from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from nested_svit import create_model, load_checkpoint

ASSETS = resources.files("nested_svit.assets")
DIGITS = Path(str(ASSETS / "digits_samples"))  # one folder per digit 0..9, two PNGs each
DIGITS_PTH = str(ASSETS / "svit_digits.pth")  # a plain state dict of the trained digits SViT
RUN = ["--workers", "0", "--threads", "1"]
TINY = ["--model", "svit_tiny", "--random-weights", "--img-size", "32", *RUN]


def digit_folders(root: Path, digits: list[str]) -> Path:
    """The sample folders of ``digits`` copied under ``root``."""
    for d in digits:
        shutil.copytree(DIGITS / d, root / d)
    return root


def direct_top1(rows: pd.DataFrame, names: list[str]) -> float:
    """The reference: the model run on each image by itself, scored against its folder name."""
    from nested_svit.data import EvalTransform
    from nested_svit.data.decode import decode_image

    model = create_model("svit_digits").eval()
    load_checkpoint(model, DIGITS_PTH)
    t = EvalTransform(img_size=32, crop_pct=1.0)
    right = []
    for image_id in rows["id"]:
        x = t(decode_image(str(DIGITS / image_id)))[None]
        with torch.no_grad():
            right.append(names[int(model(x).argmax())] == Path(image_id).parts[0])
    return 100 * float(np.mean(right))


def save_named_digits(path: Path) -> Path:
    """The trained digits SViT in our file schema with its class names '0'..'9', as ``train`` writes it."""
    from nested_svit.checkpoint import save_checkpoint

    model = create_model("svit_digits")
    load_checkpoint(model, DIGITS_PTH)
    model.class_names = [str(i) for i in range(10)]
    save_checkpoint(model, path)
    return path
