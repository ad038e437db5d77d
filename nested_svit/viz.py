"""Plots: throughput vs batch size."""
from __future__ import annotations

import os

import pandas as pd


def plot_throughput(df: pd.DataFrame, path: str | os.PathLike, title: str | None = None) -> None:
    """Images/s vs batch size (log-2 x axis), one line per model/backend."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (model, backend), group in df.groupby(["model", "backend"], sort=False):
        group = group.sort_values("batch_size")
        ax.plot(group["batch_size"], group["infer_samples_per_sec"], marker="o",
                label=model if backend == "dense" else f"{model} [{backend}]")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(df["batch_size"].unique()))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    first = df.iloc[0]
    ax.set_title(title or f"{first['device']} {first['precision']}, {first['threads']} threads, "
                          f"{first['img_size']}px, median of >= {df['rounds'].min()} interleaved rounds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
