"""Where a detector's time goes: torch.profiler over the labelled stages (spatial prior module, patch
embedding, injector, ViT blocks, extractor, output maps, deformable sampling inside injector/extractor,
FPN, RPN, RoI box head, RoI mask head, mask paste), dense vs SViT, at batch 1 and a mixed batch of 4.

    python bench/detection_breakdown.py --out bench/results/detection-breakdown-DATE.csv
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

from nested_svit.benchmark.detection import COCO_LIKE_SHAPES, DetBenchConfig, _build, _pool

LABELS = ["backbone", "backbone.spm", "backbone.patch_embed", "backbone.injector", "backbone.vit_blocks",
          "backbone.extractor", "backbone.output", "msda.sample", "neck", "rpn", "roi_bbox", "roi_mask", "mask_paste"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vit_adapter_small_maskrcnn,svit_adapter_small_maskrcnn")
    ap.add_argument("--img-scale", default="1333,800")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="detection-breakdown.csv")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = DetBenchConfig(img_scale=tuple(int(v) for v in args.img_scale.split(",")), shapes=list(COCO_LIKE_SHAPES))
    pool = _pool(cfg)
    rows = []
    for name in args.models.split(","):
        model = _build(name, replace(cfg, models=[name]), pool, torch.device("cpu"))
        inputs, metas = model.preprocess(pool)
        with torch.inference_mode():
            model.predict_preprocessed(inputs[:1], metas[:1])  # warm-up
            for bs in (1, 4):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for s in range(0, len(inputs), bs):
                        model.predict_preprocessed(inputs[s:s + bs], metas[s:s + bs])
                events = {e.key: e for e in prof.key_averages()}
                total = sum(events[k].cpu_time_total for k in ("backbone", "neck", "rpn", "roi_bbox", "roi_mask",
                                                                "mask_paste") if k in events)
                for label in LABELS:
                    ms = events[label].cpu_time_total / 1000 / len(inputs) if label in events else 0.0
                    rows.append({"model": name, "batch_size": bs, "stage": label, "ms_per_image": ms,
                                 "share_of_whole": ms * 1000 * len(inputs) / total if total else 0.0})
                print(pd.DataFrame([r for r in rows if r["model"] == name and r["batch_size"] == bs]).to_string(index=False))
    pd.DataFrame(rows).to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
