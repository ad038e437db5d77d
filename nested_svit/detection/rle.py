"""COCO run-length encoding of masks through ``pycocotools.mask`` (JSON-ready: counts as str)."""
from __future__ import annotations

import numpy as np
from torch import Tensor


def encode_masks(masks: Tensor) -> list[dict]:
    """bool ``[n, H, W]`` -> list of ``{"size": [H, W], "counts": str}``."""
    from pycocotools import mask as mask_utils

    out = []
    for m in masks:
        rle = mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        out.append(rle)
    return out
