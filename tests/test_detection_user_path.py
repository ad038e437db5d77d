"""The detection and baseline user path: every input kind, the files and flags a detector refuses, COCO
subsets and categories, keep budgets, messages that name the method, pictures, --help and list. A
small SViT-Adapter (48-d ViT, 16-channel FPN) keeps them fast."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from coco_fixtures import make_coco
from PIL import Image

from nested_svit.cli import main
from nested_svit.detection import create_detector
from nested_svit.detection.adapter import AdapterConfig
from nested_svit.detection.checkpoint import save_detector_checkpoint

SMALL = dict(embed_dim=48, num_heads=2, adapter=AdapterConfig(conv_inplane=8, deform_heads=2), fpn_channels=16,
             img_scale=(96, 64))
RUN = ["--workers", "0", "--threads", "1"]


def _detector(num_classes: int = 2, names=("square", "bar"), seed: int = 0, **extra):
    torch.manual_seed(seed)
    return create_detector("svit_adapter_tiny_maskrcnn", **SMALL, num_classes=num_classes, class_names=names, **extra)


@pytest.fixture(scope="module")
def det_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("det") / "det.pth"
    save_detector_checkpoint(_detector(), path)
    return path


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("coco"))


def _image(path: Path, size=(40, 56), seed=0, fmt=None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size[0], size[1], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt, **save)
    return path


@pytest.mark.slow
def test_detector_predict_takes_every_input_kind(tmp_path, det_file, capsys):
    root = tmp_path / "photos"
    for name in ("a.png", "b.jpg", "sub/c.png"):
        _image(root / name)
    _image(root / ".thumbs" / "hidden.png")  # hidden folder: never data
    (root / "notes.txt").write_text("not an image")
    listing = tmp_path / "list.txt"
    listing.write_text("photos/a.png\n# comment\nphotos/sub/c.png\n")
    from datasets_fixtures import write_parquet

    write_parquet(tmp_path / "pq", n=3, shards=1)
    parquet = next((tmp_path / "pq").glob("*.parquet"))
    cases = {"folder": (root, 3), "list": (listing, 2), "glob": (str(root / "*.png"), 1), "parquet": (parquet, 3)}
    for kind, (source, n) in cases.items():
        out = tmp_path / f"{kind}.jsonl"
        assert main(["predict", "--checkpoint", str(det_file), *RUN, "--input", str(source), "--out", str(out)]) == 0, kind
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == n and all(r["status"] == "ok" for r in rows), (kind, rows)
    assert "notes.txt (not an image" in capsys.readouterr().err  # listed as ignored, not a row
    out = root / "preds.jsonl"  # our own output inside the input folder is never read back
    for _ in range(2):
        assert main(["predict", "--checkpoint", str(det_file), *RUN, "--input", str(root), "--out", str(out)]) == 0
        assert len(out.read_text().splitlines()) == 3


def test_classifier_checkpoint_refused_for_detector_inference(tmp_path, coco, capsys):
    from nested_svit import create_model

    deit = tmp_path / "deit.pth"
    torch.save({"model": create_model("deit_tiny_patch16_224", embed_dim=48, num_heads=2).state_dict()}, deit)
    ann, images = coco
    args = [["predict", "--model", "svit_adapter_tiny_maskrcnn", "--checkpoint", str(deit), *RUN, "--input",
             str(images), "--out", str(tmp_path / "p.jsonl")],
            ["eval", "coco", "--checkpoint", str(deit), *RUN, "--ann", str(ann), "--images", str(images),
             "--out", str(tmp_path / "r.json")]]  # eval coco picks its default detector for this file
    for a in args:
        assert main(a) == 2
        err = capsys.readouterr().err
        assert "classification checkpoint" in err and "train" in err and "--init" in err, err
    assert not (tmp_path / "p.jsonl").exists() and not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_evit_release_args_configure_or_refuse(tmp_path):
    from nested_svit import create_model, load_checkpoint
    from nested_svit.checkpoint import CheckpointError

    torch.manual_seed(0)
    source = create_model("evit_nofuse_small", img_size=64, keep_targets=(0.5,) * 3)
    path = tmp_path / "evit-0.5-nofuse.pth"
    torch.save({"model": source.state_dict(), "args": argparse.Namespace(
        model="deit_small_patch16_shrink_base", base_keep_rate=0.5, drop_loc="(3, 6, 9)", fuse_token=False)}, path)
    with pytest.raises(CheckpointError, match=r"keep rate 0.5.*without the fused token.*evit_nofuse_small"):
        load_checkpoint(create_model("evit_small", img_size=64), path)
    folder = tmp_path / "imgs"
    for i in range(2):
        _image(folder / f"{i}.png", size=(64, 64), seed=i)
    out = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(path), *RUN, "--img-size", "64", "--input", str(folder),
                 "--out", str(out)]) == 0
    rows = pd.read_csv(out)
    with torch.no_grad():  # the file's own configuration: 16 patches, ceil(0.5 * n) kept at 3, 6, 9
        expected = source.eval().forward_features(torch.zeros(1, 3, 64, 64), return_usage=True)[1].kept_mlp[0].tolist()
    assert rows[[f"kept_b{b}" for b in range(12)]].iloc[0].tolist() == expected == [17] * 3 + [9] * 3 + [5] * 3 + [3] * 3
    assert main(["predict", "--model", "evit_small", "--checkpoint", str(path), *RUN, "--img-size", "64",
                 "--input", str(folder), "--out", str(tmp_path / "q.csv")]) == 2


def _write_coco(root: Path, images: list[dict], anns: list[dict], cats: list[dict] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    ann = root / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 1, "name": "square"}] if cats is None else cats}))
    return ann


def test_duplicate_image_ids_stop(tmp_path, det_file, capsys):
    img = tmp_path / "images"
    _image(img / "a.png")
    _image(img / "b.png", seed=1)
    ann = _write_coco(tmp_path, [{"id": 7, "file_name": "a.png", "height": 40, "width": 56},
                                 {"id": 7, "file_name": "b.png", "height": 40, "width": 56}], [],
                      [{"id": 1, "name": "square"}, {"id": 2, "name": "bar"}])
    assert main(["eval", "coco", "--checkpoint", str(det_file), *RUN, "--ann", str(ann), "--images", str(img),
                 "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "image id 7" in err and "a.png" in err and "b.png" in err


def test_exif_rotated_image_warned(tmp_path, det_file, capsys):
    img = tmp_path / "images"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 56 wide x 40 high, shown rotated: 40 wide x 56 high
    _image(img / "phone.jpg", size=(40, 56), fmt="JPEG", exif=exif.tobytes())
    _image(img / "plain.png", seed=1)
    box = {"bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0, "category_id": 1, "segmentation": [[4, 4, 24, 4, 24, 24]]}
    ann = _write_coco(tmp_path, [{"id": 1, "file_name": "phone.jpg", "height": 40, "width": 56},
                                 {"id": 2, "file_name": "plain.png", "height": 40, "width": 56}],
                      [{"id": 1, "image_id": 1, **box}, {"id": 2, "image_id": 2, **box}],
                      [{"id": 1, "name": "square"}, {"id": 2, "name": "bar"}])
    out = tmp_path / "r.json"
    assert main(["eval", "coco", "--checkpoint", str(det_file), *RUN, "--ann", str(ann), "--images", str(img),
                 "--out", str(out)]) == 0
    assert "phone.jpg 40x56 vs 56x40" in capsys.readouterr().err
    assert [m["id"] for m in json.loads(out.read_text())["size_mismatches"]] == ["phone.jpg"]


@pytest.mark.parametrize("value", ["-1", "0"])
def test_max_images_below_one(tmp_path, det_file, coco, capsys, value):
    ann, images = coco
    assert main(["eval", "coco", "--checkpoint", str(det_file), *RUN, "--ann", str(ann), "--images", str(images),
                 "--max-images", value, "--out", str(tmp_path / "r.json")]) == 2
    assert "--max-images must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--topk", "3"], ["--class-names", "x.txt"], ["--num-classes", "3"],
                                  ["--img-size", "64"], ["--crop-pct", "0.9"]])
def test_classifier_flags_refused_for_detectors(tmp_path, det_file, coco, capsys, flag):
    ann, images = coco
    for cmd in (["predict", "--input", str(images), "--out", str(tmp_path / "p.jsonl")],
                ["eval", "coco", "--ann", str(ann), "--images", str(images), "--out", str(tmp_path / "r.json")]):
        code = None
        try:
            code = main([*cmd, "--checkpoint", str(det_file), *RUN, *flag])
        except SystemExit as e:  # eval coco's parser has no classifier options at all
            code = e.code
        assert code == 2
    assert main(["predict", "--model", "svit_tiny", "--random-weights", "--img-scale", "96,64", "--input",
                 str(images), "--out", str(tmp_path / "c.csv")]) == 2
    assert "--img-scale only applies to detectors" in capsys.readouterr().err


@pytest.mark.slow
def test_detector_keep_budget_calibrates_and_bf16_runs(tmp_path, det_file, coco):
    ann, images = coco
    results = {}
    for scale in ("1.0", "0.5"):
        out = tmp_path / f"r{scale}.json"
        saved = tmp_path / f"cal{scale}.pth"
        assert main(["eval", "coco", "--checkpoint", str(det_file), *RUN, "--ann", str(ann), "--images", str(images),
                     "--calibrate", "5", "--keep-targets", scale, "--save-calibrated", str(saved), "--out", str(out)]) == 0
        results[scale] = json.loads(out.read_text())
        assert results[scale]["calibration"]["images"] == 5
    assert results["0.5"]["mean_keep_ratio_all_gates"] < results["1.0"]["mean_keep_ratio_all_gates"] - 0.1
    out = tmp_path / "again.json"  # the calibrated detector file reproduces the decisions
    assert main(["eval", "coco", "--checkpoint", str(tmp_path / "cal0.5.pth"), *RUN, "--ann", str(ann), "--images",
                 str(images), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["mean_keep_ratio"] == results["0.5"]["mean_keep_ratio"]
    bf16 = tmp_path / "bf16.jsonl"
    assert main(["predict", "--checkpoint", str(det_file), *RUN, "--precision", "bf16", "--input", str(images),
                 "--out", str(bf16)]) == 0
    rows = [json.loads(line) for line in bf16.read_text().splitlines()]
    assert len(rows) == 5 and all(r["status"] == "ok" and r["num_detections"] > 0 for r in rows)


def test_bench_plots_detectors_and_refuses_keep_targets_on_baselines(tmp_path, capsys, monkeypatch):
    """The sweep itself is bench/'s (minutes on CPU); here a sweep's rows, as it returns them, reach the plot."""
    from nested_svit.benchmark import detection

    def sweep(cfg, progress=None):
        rows = [{c: 1.0 for c in detection.COLUMNS} | {"model": m, "part": part, "batch_size": bs, "img_scale": "64x64",
                                                        "pool": "56x40", "images_per_sec": 10.0 + bs, "rounds": 1}
                for m in ("vit_adapter_tiny_maskrcnn", *cfg.models) for part in ("whole", "backbone")
                for bs in cfg.batch_sizes]
        return pd.DataFrame(rows, columns=detection.COLUMNS)

    monkeypatch.setattr(detection, "run_detection_benchmark", sweep)
    out, plot = tmp_path / "results" / "b.csv", tmp_path / "results" / "b.png"
    out.parent.mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert main(["bench", "--models", "svit_adapter_tiny_maskrcnn", "--img-scale", "64,64", "--batch-sizes", "1,2",
                 "--out", str(out)]) == 0
    # the plot goes beside --out (it went to the working directory as bench-throughput.png)
    assert Image.open(plot).size[0] > 300 and set(pd.read_csv(out)["part"]) == {"whole", "backbone"}
    assert list((tmp_path / "cwd").iterdir()) == []
    assert main(["bench", "--models", "ats_small", "--keep-targets", "0.5", "--out", str(out)]) == 2
    assert "ats_small (ATS) keeps its own token counts" in capsys.readouterr().err


def test_eval_coco_refuses_data_with_ann(tmp_path, det_file, coco, capsys):
    ann, images = coco
    assert main(["eval", "coco", "--checkpoint", str(det_file), *RUN, "--data", str(tmp_path), "--ann", str(ann),
                 "--images", str(images), "--out", str(tmp_path / "r.json")]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.slow
def test_class_count_message_and_coco_subset(tmp_path, capsys):
    from nested_svit.detection.classes import COCO_CLASSES

    path = tmp_path / "coco80.pth"
    save_detector_checkpoint(_detector(80, COCO_CLASSES), path)
    img = tmp_path / "images"
    _image(img / "a.png")
    box = {"bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0, "segmentation": [[4, 4, 24, 4, 24, 24]]}
    images = [{"id": 1, "file_name": "a.png", "height": 40, "width": 56}]
    subset = _write_coco(tmp_path / "subset", images, [{"id": 1, "image_id": 1, "category_id": 3, **box}],
                         [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}])
    out = tmp_path / "r.json"
    assert main(["eval", "coco", "--checkpoint", str(path), *RUN, "--ann", str(subset), "--images", str(img),
                 "--out", str(out)]) == 0
    assert "evaluated by class name" in json.loads(out.read_text())["categories_note"]
    dets = json.loads((tmp_path / "r.detections.json").read_text())
    assert main(["predict", "--checkpoint", str(path), *RUN, "--input", str(img), "--out", str(tmp_path / "p.jsonl")]) == 0
    raw = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])["labels"]
    assert {d["category_id"] for d in dets} <= {1, 3}  # person (label 0) -> id 1, car (label 2) -> id 3
    assert sorted(d["category_id"] for d in dets) == sorted({0: 1, 2: 3}[k] for k in raw if k in (0, 2))
    other = _write_coco(tmp_path / "other", images, [{"id": 1, "image_id": 1, "category_id": 12, **box}],
                        [{"id": 12, "name": "a"}, {"id": 26, "name": "b"}, {"id": 100, "name": "c"}, {"id": 101, "name": "d"}])
    assert main(["eval", "coco", "--checkpoint", str(path), *RUN, "--ann", str(other), "--images", str(img),
                 "--out", str(out)]) == 2
    assert "the checkpoint predicts 80 classes; the annotations have 4 categories" in capsys.readouterr().err


def test_messages_name_the_method(tmp_path, capsys):
    from datasets_fixtures import write_image_folder

    from nested_svit import create_model

    write_image_folder(tmp_path / "val", per_class=1)
    deit = tmp_path / "deit_small.pth"
    torch.save({"model": create_model("deit_small_patch16_224").state_dict()}, deit)
    assert main(["eval", "imagenet", "--model", "dynamicvit_small", "--checkpoint", str(deit), "--img-size", "32",
                 *RUN, "--data", str(tmp_path / "val"), "--out", str(tmp_path / "r.json")]) == 0
    err = capsys.readouterr().err
    assert "this DynamicViT model are random" in err and "fine-tune with 'nested-svit train'" not in err


def test_library_predict_inputs():
    det = _detector().eval()
    rgb = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    with pytest.raises(ValueError, match="predict takes a list"):
        det.predict("a.jpg")
    with pytest.raises(ValueError, match="predict takes a list"):
        det.predict(rgb)
    with pytest.raises(ValueError, match="got None"):
        det.predict(None)
    with pytest.raises(ValueError, match="image 1: image is None"):
        det.predict([rgb, None])
    same = [np.repeat(gray[..., None], 3, -1), gray, gray[..., None], np.concatenate([rgb, rgb[..., :1]], -1),
            rgb.astype(np.float32) / 255, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255]
    expected = [np.repeat(gray[..., None], 3, -1)] * 3 + [rgb] * 3
    for got, want in zip(det.predict(same), det.predict(expected)):
        assert torch.equal(got.boxes, want.boxes) and torch.equal(got.scores, want.scores)


def test_no_annotations_and_no_categories(tmp_path, det_file, capsys):
    img = tmp_path / "images"
    _image(img / "a.png")
    images = [{"id": 1, "file_name": "a.png", "height": 40, "width": 56}]
    out = tmp_path / "r.json"
    empty = _write_coco(tmp_path / "empty", images, [], [{"id": 1, "name": "square"}, {"id": 2, "name": "bar"}])
    assert main(["eval", "coco", "--checkpoint", str(det_file), *RUN, "--ann", str(empty), "--images", str(img),
                 "--out", str(out)]) == 0
    assert "no ground truth: AP undefined" in capsys.readouterr().out
    assert json.loads(out.read_text())["bbox"]["AP"] is None
    nocats = _write_coco(tmp_path / "nocats", images, [], [])
    assert main(["eval", "coco", "--checkpoint", str(det_file), *RUN, "--ann", str(nocats), "--images", str(img),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "lists no categories" in err and "num_classes must be positive" not in err


def test_help_and_list(capsys):
    import re

    for cmd in (["eval", "coco", "--help"], ["train", "--help"], ["predict", "--help"]):
        with pytest.raises(SystemExit):
            main(cmd)
        text = capsys.readouterr().out
        if cmd[0] == "eval":
            options = re.findall(r"^  (--[a-z-]+)", text, re.M)
            assert len(options) > 15 and "--split" in options and "val2017" in text.split("--split")[2]
            blocks = re.split(r"\n  (?=--)", text.split("options:", 1)[1])
            # issue 26.20: a default once at most, and never a bare "None" where the text says what happens
            assert not [b for b in blocks[1:] if "(default: None)" in b or b.count("default") > 1]
        if cmd[0] == "train":
            assert "detectors" in text and "baselines" in text
        if cmd[0] == "predict":
            assert "classifiers only" in text and "detectors only" in text
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "svit_small" in listed and "svit_adapter_small_maskrcnn" in listed and "method    evit" in listed


@pytest.mark.slow
def test_pictures_distinct_not_read_back_threshold_and_small(tmp_path, det_file):
    root = tmp_path / "photos"
    for name, seed in (("a.jpg", 0), ("a.png", 1), ("sub/x.jpg", 2), ("sub__x.jpg", 3)):
        _image(root / name, seed=seed)
    vis = root / "pictures"  # inside the input: never read back as input
    args = ["predict", "--checkpoint", str(det_file), *RUN, "--input", str(root), "--save-vis", str(vis)]
    for _ in range(2):
        assert main([*args, "--out", str(tmp_path / "p.jsonl")]) == 0
        assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 4
    pictures = sorted(p.name for p in vis.glob("*.png"))
    assert len(pictures) == 4, pictures
    assert Image.open(vis / pictures[0]).size[0] >= 2 * 360  # a 56 px image is upscaled to fit its captions
    drawn = {}
    for thr in ("0", "1.1"):  # the score threshold decides what is drawn
        folder = tmp_path / f"vis{thr}"
        assert main([*args[:-1], str(folder), "--vis-score-thr", thr, "--out", str(tmp_path / f"q{thr}.jsonl")]) == 0
        drawn[thr] = np.asarray(Image.open(folder / "a.jpg.png"), dtype=np.int32)
    assert np.abs(drawn["0"] - drawn["1.1"]).sum() > 0
