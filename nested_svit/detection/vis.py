"""Pictures of detections: boxes, masks and which tokens the gates kept.

Left panel: the image with instance masks (translucent colours), boxes and ``name score`` labels.
Right panel: the image tinted by how many of the gated blocks processed each 16x16 token (paper
Fig. 4 style: dark = pruned everywhere, bright = processed by every gate), with a colour legend.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..viz import colour_bar, font
from .detector import Detections

_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40]],
                    dtype=np.float32)


def _usage_layer(det: Detections, height: int, width: int) -> np.ndarray | None:
    """``[H, W]`` float in [0, 1]: fraction of gates that kept the token covering each original pixel."""
    if det.token_maps is None or det.meta is None or det.token_maps.shape[0] == 0:
        return None
    counts = det.token_maps.float().mean(0).numpy()  # [h16, w16] over the padded input
    sx, sy = det.meta.scale_factor[0], det.meta.scale_factor[1]
    ys = np.minimum((np.arange(height) + 0.5) * sy // 16, counts.shape[0] - 1).astype(int)
    xs = np.minimum((np.arange(width) + 0.5) * sx // 16, counts.shape[1] - 1).astype(int)
    return counts[ys][:, xs]


MIN_WIDTH = 360  # pictures of smaller images are upscaled (nearest) so captions and the legend fit


def render(image: np.ndarray, det: Detections, score_thr: float = 0.3) -> Image.Image:
    """RGB uint8 ``[H, W, 3]`` + detections -> PIL picture: the image with boxes and masks scoring at
    least ``score_thr``, and (when the detections carry token maps) the image tinted by how many gated
    blocks processed each token, with a colour bar; small images are upscaled (nearest) to fit the text."""
    from matplotlib import colormaps

    h0, w0 = image.shape[:2]
    s = max(1, -(-MIN_WIDTH // w0))
    big = np.repeat(np.repeat(image, s, 0), s, 1) if s > 1 else image
    h, w = big.shape[:2]
    left = big.astype(np.float32).copy()
    keep = (det.scores >= score_thr).nonzero().view(-1).tolist()
    masks = det.masks if isinstance(det.masks, torch.Tensor) else None
    if masks is None and isinstance(det.masks, list) and det.masks:
        import warnings

        from pycocotools import mask as mask_utils

        with warnings.catch_warnings():  # pycocotools' numpy-2 copy-keyword deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            masks = torch.from_numpy(np.stack([mask_utils.decode(m) for m in det.masks])).bool()
    for j, i in enumerate(keep):
        if masks is not None:
            m = masks[i].numpy()
            if s > 1:
                m = np.repeat(np.repeat(m, s, 0), s, 1)
            left[m] = 0.5 * left[m] + 0.5 * _PALETTE[j % len(_PALETTE)]
    panel = Image.fromarray(left.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(panel)
    for j, i in enumerate(keep):
        colour = tuple(int(c) for c in _PALETTE[j % len(_PALETTE)])
        x1, y1, x2, y2 = (v * s for v in det.boxes[i].tolist())
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=max(1, round(min(h, w) / 300)))
        draw.text((x1 + 2, y1 + 1), f"{det.names[i]} {float(det.scores[i]):.2f}", fill=colour, font=font(12))
    usage = _usage_layer(det, h0, w0)
    legend_h = 30
    panels = 1 if usage is None else 2
    canvas = Image.new("RGB", (panels * w + (panels - 1) * 8, h + legend_h), (255, 255, 255))
    canvas.paste(panel, (0, 0))
    d = ImageDraw.Draw(canvas)
    d.text((2, h + 3), f"{len(keep)} of {len(det.scores)} detections scoring >= {score_thr:g}", fill=(0, 0, 0),
           font=font(12))
    if usage is not None:
        if s > 1:
            usage = np.repeat(np.repeat(usage, s, 0), s, 1)
        heat = colormaps["viridis"](usage)[..., :3] * 255
        canvas.paste(Image.fromarray((0.45 * big + 0.55 * heat).clip(0, 255).astype(np.uint8)), (w + 8, 0))
        n = det.token_maps.shape[0]
        colour_bar(d, w + 8, h + 3, min(w // 2, 160), n, f"gated blocks (of {n})\nprocessing the token")
    return canvas


def save_picture(image: np.ndarray, det: Detections, path: str | os.PathLike, score_thr: float = 0.3) -> None:
    from ..io import atomic_write

    picture = render(image, det, score_thr)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
