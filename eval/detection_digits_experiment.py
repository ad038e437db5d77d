"""End-to-end detector recipe on real handwritten digits, on a CPU.

1. Build a COCO-format detection + instance-segmentation set from scikit-learn's digits: 2-5 digits of
   random scale (20-56 px) on dark noisy canvases of four sizes/aspect ratios, boxes and stroke masks
   (RLE), categories "0".."9"; fixed train/val splits from a seed.
2. Train a dense ViT-Adapter-T Mask R-CNN from scratch (no ImageNet weights can be downloaded here).
3. Fine-tune SViT gates (and the whole network) from it: masked execution, straight-through Gumbel
   masks, dynamic keep-ratio loss, lambda 4 (the official recipe, shortened).
4. Report on the val split: box/mask AP (pycocotools) of both, keep fractions vs targets, FPS^w/FPS^b of
   both at batch 1 and 4 (interleaved rounds, medians), and the wall time of each phase.

Run: ``python eval/detection_digits_experiment.py --out eval/results/detection_digits`` (needs
``pip install -e '.[experiment]'``). Phases are cached in the output folder; ``--fresh`` redoes them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

CANVASES = [(192, 256), (256, 192), (224, 224), (160, 288)]  # (h, w)


def build_dataset(root: Path, n_train: int, n_val: int, seed: int = 0) -> dict:
    """COCO json + PNGs under root/{train,val}; returns the two annotation paths."""
    import cv2
    from PIL import Image
    from pycocotools import mask as mask_utils
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    categories = [{"id": k + 1, "name": str(k)} for k in range(10)]
    out = {}
    for split, count in (("train", n_train), ("val", n_val)):
        images, anns = [], []
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            h, w = CANVASES[i % len(CANVASES)]
            canvas = rng.normal(20, 8, (h, w)).clip(0, 255)
            placed: list[tuple[int, int, int, int]] = []
            for _ in range(int(rng.integers(2, 6))):
                d = int(rng.integers(len(digits.target)))
                size = int(rng.integers(20, 57))
                for _try in range(20):
                    x, y = int(rng.integers(0, w - size)), int(rng.integers(0, h - size))
                    if all(x + size <= px or px + ps <= x or y + size <= py or py + ps <= y for px, py, ps, _ in placed):
                        break
                else:
                    continue
                glyph = cv2.resize(digits.images[d] / 16.0, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)
                stroke = glyph > 0.35
                canvas[y:y + size, x:x + size] = np.maximum(canvas[y:y + size, x:x + size], glyph * 235)
                full = np.zeros((h, w), dtype=np.uint8)
                full[y:y + size, x:x + size] = stroke
                ys, xs = np.nonzero(full)
                if len(xs) == 0:
                    continue
                x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
                rle = mask_utils.encode(np.asfortranarray(full))
                rle["counts"] = rle["counts"].decode("ascii")
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(digits.target[d]) + 1,
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(full.sum()), "iscrowd": 0,
                             "segmentation": rle})
                placed.append((x, y, size, d))
            name = f"{split}_{i:05d}.png"
            Image.fromarray(np.repeat(canvas.astype(np.uint8)[..., None], 3, -1)).save(root / split / name)
            images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        ann_path = root / f"{split}.json"
        ann_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
        out[split] = ann_path
    return out


def run(cmd: list[str], log) -> float:
    t0 = time.perf_counter()
    print("$ " + " ".join(cmd), file=log, flush=True)
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def timings(models: dict, images: list, rounds: int) -> dict:
    """Per-image ms (median of interleaved rounds) of whole network and backbone at batch 1 and 4."""
    from nested_svit.detection.detector import MaskRCNNDetector

    out = {}
    with torch.inference_mode():
        prepared = {k: m.preprocess(images) for k, m in models.items()}
        for bs in (1, 4):
            runners = [(k, part) for k in models for part in ("whole", "backbone")]
            times: dict = {r: [] for r in runners}

            def call(m: MaskRCNNDetector, inputs, metas, part):
                for s in range(0, len(inputs), bs):
                    m.predict_preprocessed(inputs[s:s + bs], metas[s:s + bs], "bool", backbone_only=part == "backbone")

            for r in runners:
                call(models[r[0]], *prepared[r[0]], r[1])
            for _ in range(rounds):
                for r in runners:
                    t0 = time.perf_counter()
                    call(models[r[0]], *prepared[r[0]], r[1])
                    times[r].append((time.perf_counter() - t0) / len(images) * 1000)
            for (k, part), ts in times.items():
                out[f"{k}_{part}_batch{bs}_ms"] = statistics.median(ts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="eval/results/detection_digits")
    ap.add_argument("--train-images", type=int, default=600)
    ap.add_argument("--val-images", type=int, default=100)
    ap.add_argument("--dense-epochs", type=int, default=8)
    ap.add_argument("--svit-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"  # data and checkpoints (not committed)
    work.mkdir(exist_ok=True)
    torch.set_num_threads(args.threads)
    log = open(out / "run.log", "a")
    result: dict = {"phases_s": {}}
    if not args.fresh and (out / "result.json").exists():  # keep the times of cached phases
        result["phases_s"] = json.loads((out / "result.json").read_text()).get("phases_s", {})
    cli = [sys.executable, "-m", "nested_svit.cli"]
    common = ["--img-scale", "256,192", "--threads", str(args.threads), "--workers", "0", "--batch-size", "4"]
    if args.fresh or not (work / "val.json").exists():
        t0 = time.perf_counter()
        paths = build_dataset(work, args.train_images, args.val_images)
        result["phases_s"]["dataset"] = time.perf_counter() - t0
    paths = {"train": work / "train.json", "val": work / "val.json"}
    train_data = ["--ann", str(paths["train"]), "--images", str(work / "train")]
    dense, svit = work / "dense.pth", work / "svit.pth"
    if args.fresh or not dense.exists():
        result["phases_s"]["dense_training"] = run(
            cli + ["train", "--model", "vit_adapter_tiny_maskrcnn", *train_data, *common, "--epochs", str(args.dense_epochs),
                   "--lr", "2e-4", "--warmup-steps", "100", "--schedule", "cosine", "--clip-grad", "10",
                   "--out", str(dense), "--restart", "--log-every", "25"], log)
    if args.fresh or not svit.exists():
        result["phases_s"]["svit_finetune"] = run(
            cli + ["train", "--model", "svit_adapter_tiny_maskrcnn", "--init", str(dense), *train_data, *common,
                   "--epochs", str(args.svit_epochs), "--lr", "5e-5", "--gate-lr", "1e-3", "--warmup-steps", "20",
                   "--schedule", "cosine", "--clip-grad", "10", "--out", str(svit), "--restart", "--log-every", "25"], log)
    calibrated = work / "svit_calibrated.pth"
    if args.fresh or not calibrated.exists():  # thresholds calibrated to the targets on train images (no retraining)
        from nested_svit import load_checkpoint as _load
        from nested_svit.detection import create_detector as _create
        from nested_svit.detection.checkpoint import save_detector_checkpoint
        from nested_svit.detection import read_image as _read

        t0 = time.perf_counter()
        m = _create("svit_adapter_tiny_maskrcnn", img_scale=(256, 192), num_classes=10,
                    class_names=tuple(str(k) for k in range(10)))
        _load(m, svit)
        m.eval().calibrate_keep([_read(work / "train" / f"train_{i:05d}.png") for i in range(64)])
        save_detector_checkpoint(m, calibrated)
        result["phases_s"]["calibration"] = time.perf_counter() - t0
    val = ["--ann", str(paths["val"]), "--images", str(work / "val"), "--threads", str(args.threads), "--workers", "0",
           "--batch-size", "4"]
    for name, ckpt in (("dense", dense), ("svit", svit), ("svit_calibrated", calibrated)):
        res_path = out / f"coco-{name}.json"
        result["phases_s"][f"eval_{name}"] = run(cli + ["eval", "coco", "--checkpoint", str(ckpt), *val,
                                                        "--out", str(res_path)], log)
        res = json.loads(res_path.read_text())
        result[name] = {"bbox": res["bbox"], "segm": res["segm"], "mean_keep_ratio": res["mean_keep_ratio"],
                        "fps_whole_eval": res["fps_whole"], "fps_backbone_eval": res["fps_backbone"]}
        Path(res["detections_file"]).unlink(missing_ok=True)  # large; the metrics are kept
    from nested_svit import load_checkpoint
    from nested_svit.detection import create_detector
    from nested_svit.detection.detector import MaskRCNNDetector  # noqa: F401
    from nested_svit.registry import SVIT_KEEP_TARGETS

    models = {}
    for name, model_name, ckpt in (("dense", "vit_adapter_tiny_maskrcnn", dense), ("svit", "svit_adapter_tiny_maskrcnn", svit),
                                   ("svit_calibrated", "svit_adapter_tiny_maskrcnn", calibrated)):
        m = create_detector(model_name, img_scale=(256, 192), num_classes=10)
        load_checkpoint(m, ckpt)
        models[name] = m.eval()
    from nested_svit.detection import read_image

    pool = [read_image(work / "val" / f"val_{i:05d}.png") for i in range(4)]  # the four canvas shapes
    t0 = time.perf_counter()
    result["timing_ms_per_image"] = timings(models, pool, rounds=7)
    result["phases_s"]["timing"] = time.perf_counter() - t0
    t = result["timing_ms_per_image"]
    for variant in ("svit", "svit_calibrated"):
        for bs in (1, 4):
            for part in ("whole", "backbone"):
                result[f"speedup_{variant}_{part}_batch{bs}"] = t[f"dense_{part}_batch{bs}_ms"] / t[f"{variant}_{part}_batch{bs}_ms"]
    result["keep_targets"] = list(SVIT_KEEP_TARGETS)
    for variant in ("svit", "svit_calibrated"):
        result[f"ap_difference_box_{variant}"] = result[variant]["bbox"]["AP"] - result["dense"]["bbox"]["AP"]
        result[f"ap_difference_mask_{variant}"] = result[variant]["segm"]["AP"] - result["dense"]["segm"]["AP"]
    result["command"] = "python eval/detection_digits_experiment.py --out " + str(args.out)
    result["torch_version"] = torch.__version__
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k in ("dense", "svit", "svit_calibrated")}, indent=1))
    print({k: round(v, 3) for k, v in result.items() if k.startswith("speedup")}, result["phases_s"])


if __name__ == "__main__":
    main()
