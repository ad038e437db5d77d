"""Plots: throughput vs batch size (classifier and detector sweeps), and token-usage pictures."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def _lines(df: pd.DataFrame, path: str | os.PathLike, keys: list[str], label, y: str, title: str) -> None:
    """One line per ``keys`` group of ``y`` against batch size (log-2 x axis), written as a PNG."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, group in df.groupby(keys, sort=False):
        group = group.sort_values("batch_size")
        ax.plot(group["batch_size"], group[y], marker="o", label=label(*key))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(df["batch_size"].unique()))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_throughput(df: pd.DataFrame, path: str | os.PathLike, title: str | None = None) -> None:
    """Classifier sweep (``benchmark.harness``): images/s vs batch size, one line per model/backend."""
    first = df.iloc[0]
    _lines(df, path, ["model", "backend"], lambda m, b: m if b == "dense" else f"{m} [{b}]", "infer_samples_per_sec",
           title or f"{first['device']} {first['precision']}, {first['threads']} threads, "
                    f"{first['img_size']}px, median of >= {df['rounds'].min()} interleaved rounds")


def plot_detection_throughput(df: pd.DataFrame, path: str | os.PathLike, title: str | None = None) -> None:
    """Detector sweep (``benchmark.detection``): FPS^w (whole network) and FPS^b (backbone) vs batch
    size, one line per model and part, dense and pruned side by side."""
    first = df.iloc[0]
    _lines(df, path, ["model", "part"], lambda m, p: f"{m} ({'FPS^w' if p == 'whole' else 'FPS^b'})", "images_per_sec",
           title or f"{first['img_scale']} mixed-size pool, {first['threads']} threads, "
                    f"median of {df['rounds'].min()} interleaved rounds")


def colour_bar(draw, x: int, y: int, width: int, ticks: int, label: str) -> None:
    """A viridis bar at (x, y) on a PIL ``ImageDraw`` with tick marks and values 0 .. ``ticks``, and its
    label to the right."""
    from matplotlib import colormaps

    for i in range(width):
        c = tuple(int(v * 255) for v in colormaps["viridis"](i / max(width - 1, 1))[:3])
        draw.line([(x + i, y), (x + i, y + 8)], fill=c)
    step = max(1, -(-ticks // 4))
    marks = [t for t in range(0, ticks + 1, step) if ticks - t >= step / 2 or t == ticks] + [ticks]
    for t in sorted(set(marks)):
        tx = x + round(t / max(ticks, 1) * (width - 1))
        draw.line([(tx, y + 8), (tx, y + 11)], fill=(0, 0, 0))
        draw.text((tx - 3, y + 12), str(t), fill=(0, 0, 0))
    draw.text((x + width + 8, y), label, fill=(0, 0, 0))


def token_usage_picture(image, keep, scale: int = 4):
    """Which tokens each gate kept, for one image.

    image: uint8 ``[H, W, 3]`` (what the model saw); keep: bool ``[G, gh, gw]`` per gate.
    Top: the image, and the image tinted by how many of the G gated blocks processed each token
    (paper Fig. 4 style, viridis: dark = pruned by every gate, yellow = kept by every gate).
    Bottom: one small panel per gate, pruned tokens greyed out. -> PIL image.
    """
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    g, gh, gw = keep.shape
    big = Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST)
    counts = keep.float().mean(0).numpy() if g else np.ones((gh, gw))
    cell = np.kron(counts, np.ones((h // gh, w // gw)))
    heat = (colormaps["viridis"](cell)[..., :3] * 255).astype(np.float32)
    tinted = Image.fromarray((0.4 * image + 0.6 * heat).clip(0, 255).astype(np.uint8)).resize(big.size, Image.NEAREST)
    small_w = max(big.size[0] * 2 // max(g, 1), 24)
    small_h = small_w * h // w
    pad, text_h, bar_h = 6, 14, 28
    canvas = Image.new("RGB", (max(2 * big.size[0] + pad, 300), big.size[1] + text_h + bar_h
                               + (small_h + text_h if g else 0) + 2 * pad), (255, 255, 255))
    canvas.paste(big, (0, text_h))
    canvas.paste(tinted, (big.size[0] + pad, text_h))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), "input", fill=(0, 0, 0))
    draw.text((big.size[0] + pad + 2, 1), "tokens, tinted", fill=(0, 0, 0))
    colour_bar(draw, 2, text_h + big.size[1] + 4, min(160, canvas.size[0] // 2), g,
               f"gated blocks (of {g})\nprocessing the token")
    y = text_h + big.size[1] + bar_h + pad
    for k in range(g):
        mask = np.kron(keep[k].numpy(), np.ones((h // gh, w // gw), dtype=bool))
        grey = image.mean(-1, keepdims=True).repeat(3, -1) * 0.35 + 160
        panel = np.where(mask[..., None], image, grey).astype(np.uint8)
        x = k * (small_w + 2)
        canvas.paste(Image.fromarray(panel).resize((small_w, small_h), Image.NEAREST), (x, y + text_h))
        draw.text((x + 1, y), f"gate {k}: {mask.mean():.0%}", fill=(0, 0, 0))
    return canvas
