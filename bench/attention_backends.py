"""Variable-length attention alone: per-image loop vs padded (+ key mask) vs nested, over head sizes,
batch sizes and sequence lengths (lengths vary +-40% around the nominal), and ``auto`` (one backend for the
whole run: ``loop`` on CPU). Writes ``bench/results/attention-backends-<date>.csv``. ``padded`` here pads to
the batch's longest sequence, as a caller without ``pad_to`` gets (the engine pads each image to its own
token count, which is batch-invariant). The 2026-11-24 record had a per-call ``cpu-auto`` column: that choice
made an image's values depend on its batch and is gone (DESIGN.md, "Batch invariance").

Run: ``python bench/attention_backends.py`` on an idle machine.
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

import pandas as pd
import torch

from nested_svit.attention import resolve_backend, varlen_attention
from nested_svit.benchmark.timing import median_ms
from nested_svit.tokens import Layout


def main() -> int:
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for heads, head_dim in [(2, 32), (3, 64), (6, 64), (12, 64)]:
            for batch in [4, 16, 64, 256]:
                for nominal in [20, 40, 70, 100, 140, 197]:
                    scale = 0.6 + 0.8 * torch.rand(batch, generator=gen)
                    layout = Layout.from_lengths((scale * nominal).long().clamp(1, 197).tolist())
                    qkv = torch.randn(layout.total, 3 * heads * head_dim, generator=gen)
                    repeats = max(5, min(200, int(2e6 / (layout.total * heads * head_dim))))
                    row = {"heads": heads, "head_dim": head_dim, "batch": batch, "nominal_len": nominal,
                           "mean_len": layout.total / batch, "max_len": layout.max_len}
                    for backend in ("loop", "padded", "nested"):
                        row[f"{backend}_ms"] = median_ms(lambda: varlen_attention(qkv, heads, layout, backend), repeats)
                    row["auto_ms"] = row[f"{resolve_backend('auto', 'cpu')}_ms"]
                    rows.append(row)
                    print(row, file=sys.stderr)
    df = pd.DataFrame(rows)
    df["padded_over_loop"] = df["padded_ms"] / df["loop_ms"]
    df["auto_over_best"] = df["auto_ms"] / df[["loop_ms", "padded_ms", "nested_ms"]].min(axis=1)
    out = Path(__file__).parent / "results" / f"attention-backends-{datetime.date.today()}.csv"
    df.to_csv(out, index=False)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"auto within {df.auto_over_best.max():.2f}x of the best backend everywhere (median "
          f"{df.auto_over_best.median():.2f}); written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
