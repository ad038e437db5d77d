"""Where batch-1 time goes: SViT-S blocks at the kept token counts vs the FLOP-proportional ideal.

For one calibrated image, times (median of interleaved repeats, 2 threads):
  * each block standalone on exactly the tokens it processes (packed, no gate, no gather/scatter),
  * the same block on all 197 tokens, scaled by the block's FLOP ratio (the ideal),
  * each gate, and gather + scatter,
and writes ``bench/results/batch1-breakdown-<date>.csv``. The gap between "standalone" and "ideal"
is kernel efficiency at small token counts, which no scheduling of the packed engine can remove.

Run: ``python bench/batch1_breakdown.py``.
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

import pandas as pd
import torch

from nested_svit import create_model
from nested_svit.attention import VarlenContext
from nested_svit.benchmark.timing import median_ms
from nested_svit.tokens import Layout, gather, scatter


def block_flops(n: int, c: int) -> float:
    """One block on ``n`` tokens: linears 24 n C^2 + attention 4 n^2 C (as nested_svit.benchmark.flops)."""
    return 24 * n * c * c + 4 * n * n * c


def main() -> int:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = create_model("svit_small").eval()
    calib = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    model.calibrate_keep(calib)
    image = calib[:1]
    cfg = model.config
    rows = []
    with torch.inference_mode():
        _, usage = model.forward_features(image, return_usage=True)
        kept = usage.kept[0].tolist()
        x = model.embed(image)
        full = torch.randn(197, cfg.embed_dim)
        for i, block in enumerate(model.blocks):
            n = kept[i]
            part = torch.randn(n, cfg.embed_dim)
            standalone = median_ms(lambda: block(part, VarlenContext(Layout.uniform(1, n))), 60, 5)
            dense = median_ms(lambda: block(full, VarlenContext(Layout.uniform(1, 197))), 60, 5)
            ratio = block_flops(n, cfg.embed_dim) / block_flops(197, cfg.embed_dim)
            k = cfg.gate_blocks.index(i) if i in cfg.gate_blocks else None
            gate_ms = median_ms(lambda: model.gates[k].margin(x.values), 60, 5) if k is not None else 0.0
            keep = torch.zeros(197, dtype=torch.bool)
            keep[torch.randperm(197)[:n]] = True
            move_ms = median_ms(lambda: scatter(x, gather(x, keep), inplace=True), 60, 5) if k is not None else 0.0
            rows.append({"block": i, "kept": n, "flop_ratio": ratio, "standalone_ms": standalone,
                         "ideal_ms": dense * ratio, "full_ms": dense, "gate_ms": gate_ms, "gather_scatter_ms": move_ms})
    df = pd.DataFrame(rows)
    out = Path(__file__).parent / "results" / f"batch1-breakdown-{datetime.date.today()}.csv"
    df.to_csv(out, index=False)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    total_full = df.full_ms.sum()
    print(f"dense blocks: {total_full:.2f} ms; pruned blocks standalone: {df.standalone_ms.sum():.2f} ms; "
          f"FLOP ideal: {df.ideal_ms.sum():.2f} ms; gates: {df.gate_ms.sum():.2f} ms; "
          f"gather+scatter: {df.gather_scatter_ms.sum():.2f} ms")
    bound = total_full / (df.standalone_ms.sum() + df.gate_ms.sum() + df.gather_scatter_ms.sum())
    ideal = total_full / df.ideal_ms.sum()
    print(f"kernel-limited speed-up {bound:.3f} vs FLOP-ideal (blocks only) {ideal:.3f}: "
          f"best reachable efficiency ~ {bound / ideal:.3f}; written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
