"""eval coco / predict with detectors through the CLI; the evaluator against direct pycocotools calls."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from coco_fixtures import SIZES, make_coco
from procs import cli_command
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from nested_svit.cli import main
from nested_svit.evaluation.detection import STAT_NAMES, coco_metrics

COMMON = ["--model", "svit_adapter_tiny_maskrcnn", "--img-scale", "192,128", "--workers", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def checkpoint(tiny_detector_file) -> Path:
    return tiny_detector_file


_cli = cli_command


def _quiet_coco(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _direct_stats(gt: COCO, results: list[dict], iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return list(ev.stats)


def test_eval_coco_equals_direct_pycocotools(tmp_path, checkpoint):
    ann, images = make_coco(tmp_path / "coco", corrupt=1, missing=3)
    out = tmp_path / "res.json"
    assert main(["eval", "coco", *COMMON, "--checkpoint", str(checkpoint), "--ann", str(ann), "--images", str(images),
                 "--batch-size", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["num_images"] == len(SIZES) and res["num_evaluated"] == len(SIZES) - 2 and res["num_skipped"] == 2
    reasons = {s["id"]: s["reason"] for s in res["skipped"]}
    assert "cannot decode" in reasons["img001.png"] and "not found" in reasons["img003.png"]
    dets = json.loads(Path(res["detections_file"]).read_text())
    gt = _quiet_coco(ann)
    assert {d["category_id"] for d in dets} <= {3, 7}  # original (non-contiguous) category ids
    gt.loadRes(dets)  # the results file is valid COCO results
    for iou_type in ("bbox", "segm"):
        direct = _direct_stats(gt, dets, iou_type)
        assert [res[iou_type][n] for n in STAT_NAMES] == pytest.approx(direct, abs=1e-12)
    assert set(res["mean_keep_ratio"]) == {f"block{b}" for b in range(3, 12)}
    assert res["fps_whole"] > 0 and res["fps_backbone"] > res["fps_whole"]


def test_perfect_detections_give_ap_one(tmp_path):
    ann, _ = make_coco(tmp_path / "coco")
    gt = _quiet_coco(ann)
    results = []
    for a in gt.loadAnns(gt.getAnnIds()):
        rle = gt.annToRLE(a)
        rle["counts"] = rle["counts"].decode("ascii")
        results.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                        "segmentation": rle})
    stats = coco_metrics(gt, results, sorted(gt.getImgIds()))
    assert stats["bbox"]["AP"] == pytest.approx(1.0) and stats["segm"]["AP"] == pytest.approx(1.0)
    assert stats["bbox"]["AP50"] == pytest.approx(1.0)
    worse = [dict(r, bbox=[r["bbox"][0] + r["bbox"][2] / 2, *r["bbox"][1:]]) for r in results]
    assert coco_metrics(gt, worse, sorted(gt.getImgIds()), ("bbox",))["bbox"]["AP"] < 0.5
    empty = coco_metrics(gt, [], sorted(gt.getImgIds()))
    assert empty["bbox"]["AP"] == 0.0


@pytest.mark.slow
def test_killed_eval_coco_resumes_to_same_result(tmp_path, checkpoint, kill_midway):
    sizes = [(120, 160), (96, 200), (160, 120)] * 3
    ann, images = make_coco(tmp_path / "coco", sizes=sizes)
    args = ["eval", "coco", *COMMON, "--checkpoint", str(checkpoint), "--ann", str(ann), "--images", str(images),
            "--batch-size", "1"]
    interrupted = tmp_path / "interrupted.json"
    parts = tmp_path / "interrupted.json.parts"
    done = len(kill_midway(_cli(*args, "--out", str(interrupted)), parts, 3))
    assert 3 <= done < len(sizes) and not interrupted.exists(), "the run should have been killed midway"
    assert subprocess.run(_cli(*args, "--out", str(interrupted)), capture_output=True).returncode == 0
    clean = tmp_path / "clean.json"
    assert subprocess.run(_cli(*args, "--out", str(clean)), capture_output=True).returncode == 0
    a, b = json.loads(interrupted.read_text()), json.loads(clean.read_text())
    for key in ("bbox", "segm", "mean_keep_ratio", "token_usage_histogram", "num_images", "num_detections"):
        assert a[key] == b[key], key
    assert json.loads(Path(a["detections_file"]).read_text()) == json.loads(Path(b["detections_file"]).read_text())
    assert not parts.exists()


@pytest.mark.slow
def test_torchrun_two_processes_equal_single(tmp_path, checkpoint, torchrun):
    ann, images = make_coco(tmp_path / "coco")
    common = ["eval", "coco", *COMMON, "--checkpoint", str(checkpoint), "--ann", str(ann), "--images", str(images),
              "--batch-size", "1"]
    single, dist = tmp_path / "single.json", tmp_path / "dist.json"
    assert main([*common, "--out", str(single)]) == 0
    run = torchrun("-m", "nested_svit.cli", *common, "--out", str(dist), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(dist.read_text())
    assert b["world_size"] == 2
    for key in ("bbox", "segm", "mean_keep_ratio", "num_images", "num_detections"):
        assert a[key] == b[key], key


@pytest.mark.slow
def test_predict_with_detector_rows_json_and_pictures(tmp_path, checkpoint):
    _, images = make_coco(tmp_path / "coco")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    out, vis = tmp_path / "preds.json", tmp_path / "vis"
    assert main(["predict", *COMMON, "--checkpoint", str(checkpoint), "--input", str(images), "--out", str(out),
                 "--save-vis", str(vis)]) == 0
    rows = pd.DataFrame(json.loads(out.read_text()))
    assert len(rows) == len(SIZES) + 1 and (rows["status"] == "skipped").sum() == 1
    ok = rows[rows["status"] == "ok"]
    for r in ok.itertuples():
        assert len(r.boxes) == len(r.scores) == len(r.labels) == len(r.names) == len(r.masks_rle) == r.num_detections
        assert set(r.names) <= {"square", "bar"}  # names carried by the checkpoint's config
    first = ok.iloc[0]
    m = mask_utils.decode(json.loads(first["masks_rle"][0]))
    assert m.shape == (first["height"], first["width"])
    assert sorted(p.name for p in vis.glob("*.png")) == sorted(f"img{i:03d}.png" for i in range(len(SIZES)))
    # parquet output, and the same detections
    pq = tmp_path / "preds.parquet"
    assert main(["predict", *COMMON, "--checkpoint", str(checkpoint), "--input", str(images), "--out", str(pq)]) == 0
    assert pd.read_parquet(pq)["num_detections"].tolist() == rows["num_detections"].tolist()


def test_bad_detector_inputs_fail_before_images(tmp_path, capsys):
    ann, images = make_coco(tmp_path / "coco")
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"backbone.foo": torch.zeros(1)}}, bad)
    assert main(["eval", "coco", *COMMON, "--checkpoint", str(bad), "--ann", str(ann), "--images", str(images),
                 "--out", str(tmp_path / "r.json")]) == 2
    assert "does not fit" in capsys.readouterr().err and not (tmp_path / "r.json.parts").exists()
    assert main(["eval", "coco", *COMMON, "--random-weights", "--ann", str(ann), "--images", str(images),
                 "--img-scale", "10,x", "--out", str(tmp_path / "r.json")]) == 2
    assert main(["eval", "coco", *COMMON, "--random-weights", "--data", str(tmp_path), "--out",
                 str(tmp_path / "r.json")]) == 2
    assert "instances_val2017.json" in capsys.readouterr().err
