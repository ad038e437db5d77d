"""Plots: throughput vs batch size (classifier and detector sweeps), reliability diagrams, and token-usage
pictures."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def font(size: int = 12):
    """The pictures' font: Pillow's scalable default (FreeType), so text is spaced and sized as asked."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _plot(df: pd.DataFrame, path: str | os.PathLike, runners: list[str], label, style, y: str, band, ideal,
          title: str) -> None:
    """Throughput against batch size (log-2 x axis, y from 0): one line per runner (``runners``: the
    columns that name one), its p10-p90 spread shaded (``band(group)`` -> (low, high) or None), and for a
    pruned runner its FLOP-ideal reference dotted (``ideal(group)`` -> values or None), as a PNG.
    ``style(*key)`` -> (colour key, line style): one colour per model, a line style per part."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = {}
    markers = "osD^vP*X"
    groups = list(df.groupby(runners, sort=False))
    for n, (key, group) in enumerate(groups):
        group = group.sort_values("batch_size")
        colour_key, linestyle = style(*key)
        colour = colours.setdefault(colour_key, f"C{len(colours) % 10}")
        # each runner a little to the side (log-2 x axis), so equal figures never hide a curve
        x = group["batch_size"].to_numpy() * 2 ** (0.04 * (n - (len(groups) - 1) / 2))
        ax.plot(x, group[y], marker=markers[n % len(markers)], markersize=5, linestyle=linestyle, color=colour,
                label=label(*key), zorder=3)
        spread = band(group)
        if spread is not None:
            ax.fill_between(x, spread[0], spread[1], color=colour, alpha=0.15, linewidth=0, zorder=1)
        reference = ideal(group)
        if reference is not None:
            ax.plot(x, reference, linestyle=":", color=colour, linewidth=1.2, zorder=2,
                    label=f"{label(*key)}: FLOP ideal")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(df["batch_size"].unique()))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    values = df[y][df[y] > 0]
    if len(values) and values.max() / values.min() > 8:  # FPS^w and FPS^b, batch 1 and 1024: a log axis
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s (shaded: p10-p90 of the rounds)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ideal(group: pd.DataFrame, rate: str):
    """A pruned runner's FLOP-ideal images/s: the dense model's (its own rate over its measured speed-up)
    times the ideal speed-up; None for a dense runner."""
    if (group["ideal_speedup"] - 1).abs().max() < 1e-9 or group["speedup"].isna().all():
        return None
    return (group[rate] / group["speedup"] * group["ideal_speedup"]).to_numpy()


def plot_throughput(df: pd.DataFrame, path: str | os.PathLike, title: str | None = None) -> None:
    """Classifier sweep (``benchmark.harness``): images/s vs batch size, one line per runner (model, runtime,
    precision, backend; a colour per model and runtime, reduced precisions dash-dotted, compiled runners
    dashed); the pruned models' FLOP ideal (the dense model's images/s times the ideal speed-up) dotted."""
    first = df.iloc[0]

    def band(g):
        return g["batch_size"] / (g["infer_step_time_p90"] / 1000), g["batch_size"] / (g["infer_step_time_p10"] / 1000)

    df = df.assign(**{c: v for c, v in (("compiled", False), ("runtime", "nested_svit"), ("precision", "fp32"))
                      if c not in df})

    def label(m, runtime, precision, b, compiled):
        return (m if b == "dense" else f"{m} [{b}]") + f" {precision}" + (", compiled" if compiled else "")

    def style(m, runtime, precision, b, compiled):
        return (m, "--" if compiled else "-" if precision == "fp32" else "-.")

    precisions = ",".join(dict.fromkeys(df["precision"]))
    _plot(df, path, ["model", "runtime", "precision", "backend", "compiled"], label, style,
          "infer_samples_per_sec", band, lambda g: _ideal(g, "infer_samples_per_sec"),
          title or f"{first['device']} {precisions}, {first['threads']} threads, {first['img_size']}px, "
                    f"median of >= {df['rounds'].min()} interleaved rounds")


def plot_detection_throughput(df: pd.DataFrame, path: str | os.PathLike, title: str | None = None) -> None:
    """Detector sweep (``benchmark.detection``): FPS^w (whole network, solid) and FPS^b (backbone,
    dashed) vs batch size, a colour per model (dense and pruned side by side), the pruned models' FLOP
    ideal dotted."""
    first = df.iloc[0]

    def band(g):
        return 1000 / g["time_per_image_p90_ms"], 1000 / g["time_per_image_p10_ms"]

    device = first["device"] if "device" in df.columns else "cpu"
    _plot(df, path, ["model", "part"], lambda m, p: f"{m} ({'FPS^w' if p == 'whole' else 'FPS^b'})",
          lambda m, p: (m, "-" if p == "whole" else "--"), "images_per_sec", band, lambda g: _ideal(g, "images_per_sec"),
          title or f"{device}, {first['img_scale']} mixed-size pool, {first['threads']} threads, "
                    f"median of {df['rounds'].min()} interleaved rounds")


def reliability_diagram(bins: pd.DataFrame, path: str | os.PathLike, title: str, ece: float) -> None:
    """A reliability diagram as a PNG: per bin of the top-1 probability (``bins``: ``lower, upper,
    images, accuracy, confidence``), the accuracy as a bar, the bin's mean top-1 probability as a red
    mark with the gap between them as a red line beside the bar (never drawn over it: an underconfident
    bin, accuracy 1.0 at confidence 0.54, reads 1.0), the diagonal of perfect calibration, and below it
    how many images each bin holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    filled = bins[bins["images"] > 0]
    width = (filled["upper"] - filled["lower"]).clip(lower=1 / 60).to_numpy()
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5.2, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    reliability_axes(ax, filled, width)
    ax.set_title(f"{title}\nECE {100 * ece:.2f}% ({len(bins) - 1} bins)", fontsize=9)
    counts.bar(filled["lower"], filled["images"], width=width, align="edge", color="grey", edgecolor="black",
               linewidth=0.6)
    counts.set_xlabel("top-1 probability")
    counts.set_ylabel("images")
    counts.grid(True, alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def reliability_axes(ax, filled: pd.DataFrame, width) -> None:
    """The upper panel: accuracy bars, each bin's mean top-1 probability as a mark across its bar, the
    gap as a line at the bar's right edge, the diagonal."""
    import numpy as np

    accuracy, confidence = filled["accuracy"].to_numpy(), filled["confidence"].to_numpy()
    lower = filled["lower"].to_numpy()
    ax.bar(lower, accuracy, width=width, align="edge", color="C0", alpha=0.8, edgecolor="black", linewidth=0.6,
           label="accuracy of the bin")
    ax.hlines(confidence, lower, lower + width, color="C3", linewidth=2, label="its mean top-1 probability")
    ax.vlines(lower + width, np.minimum(confidence, accuracy), np.maximum(confidence, accuracy), color="C3",
              linewidth=1.5, linestyle=":", label="gap")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, alpha=0.3)


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
        draw.text((tx - 3, y + 12), str(t), fill=(0, 0, 0), font=font(10))
    draw.text((x + width + 8, y - 2), label, fill=(0, 0, 0), font=font(11))


def token_usage_picture(image, keep, scale: int = 4, blocks=None, caption: str = ""):
    """Which tokens each gate kept, for one image.

    image: uint8 ``[H, W, 3]`` (what the model saw); keep: bool ``[G, gh, gw]`` per gate (selection
    stage); blocks: the block (0-based, as the tables) each gate acts at; caption: a line under the
    images (the prediction). Top: the image, and the image tinted by how many of the G gated blocks
    processed each token (paper Fig. 4 style, viridis: dark = pruned by every gate, yellow = kept by
    every gate). Bottom: one small panel per gate, pruned tokens greyed out, in rows. -> PIL image.
    """
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    text = font(12)
    h, w = image.shape[:2]
    g, gh, gw = keep.shape
    blocks = list(blocks) if blocks is not None else list(range(g))
    big = Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST)
    counts = keep.float().mean(0).numpy() if g else np.ones((gh, gw))
    cell = np.kron(counts, np.ones((h // gh, w // gw)))
    heat = (colormaps["viridis"](cell)[..., :3] * 255).astype(np.float32)
    tinted = Image.fromarray((0.4 * image + 0.6 * heat).clip(0, 255).astype(np.uint8)).resize(big.size, Image.NEAREST)
    pad, line, bar_h = 6, 16, 34
    width = max(2 * big.size[0] + pad, 360)
    panel_w = max(104, (width + 2) // 5 - 2)  # room for "block 11: 100%"
    panel_h = panel_w * h // w
    per_row = max(1, (width + 2) // (panel_w + 2))
    rows = -(-g // per_row) if g else 0
    top = line + big.size[1] + (line if caption else 0)
    canvas = Image.new("RGB", (width, top + bar_h + rows * (line + panel_h + pad) + pad), (255, 255, 255))
    canvas.paste(big, (0, line))
    canvas.paste(tinted, (big.size[0] + pad, line))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), "input", fill=(0, 0, 0), font=text)
    draw.text((big.size[0] + pad + 2, 1), "tokens, tinted", fill=(0, 0, 0), font=text)
    if caption:
        draw.text((2, line + big.size[1] + 1), caption, fill=(0, 0, 0), font=text)
    colour_bar(draw, 2, top + 4, min(160, width // 2), g, f"gated blocks (of {g})\nprocessing the token")
    for k in range(g):
        mask = np.kron(keep[k].numpy(), np.ones((h // gh, w // gw), dtype=bool))
        grey = image.mean(-1, keepdims=True).repeat(3, -1) * 0.35 + 160
        panel = np.where(mask[..., None], image, grey).astype(np.uint8)
        x, y = (k % per_row) * (panel_w + 2), top + bar_h + (k // per_row) * (line + panel_h + pad)
        canvas.paste(Image.fromarray(panel).resize((panel_w, panel_h), Image.NEAREST), (x, y + line))
        draw.text((x + 1, y + 1), f"block {blocks[k]}: {mask.mean():.0%}", fill=(0, 0, 0), font=text)
    return canvas
