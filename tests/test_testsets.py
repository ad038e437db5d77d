"""ImageNet test sets scored as their authors do (ReaL, V2's index folders, A/R's 200 classes, several
sets in one run, per-class accuracy and calibration), each checked against figures computed here from
the model's full logits (an independent per-image pipeline, ``classify_reference``), timm's ReaL
scorer and timm's published class lists."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from classify_reference import MODEL_ARGS, reference_logits, write_checkpoint
from datasets_fixtures import make_image
from procs import cli_command

from nested_svit.cli import main
from nested_svit.data.classes import imagenet_classes
from nested_svit.data.testset_labels import read_real_labels, subset_wnids, valid_labels

N = 16
WNIDS = imagenet_classes()[0]
TIMM_INFO = Path(__import__("timm").__file__).parent / "data" / "_info"


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """(checkpoint, N images, their ``[N, 1000]`` reference logits): a head scaled so that the top-1
    probabilities spread over the calibration bins."""
    ckpt = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "svit_tiny.pth", head_scale=30.0)
    rng = np.random.default_rng(5)
    images = [make_image(rng, size=(60 + 3 * i, 50 + 2 * i)) for i in range(N)]
    return ckpt, images, reference_logits(ckpt, images)


def place(root: Path, images, layout: dict[int, str]) -> list[int]:
    """Write image ``i`` (lossless PNG bytes) at ``root / layout[i]``; -> the images in the order an
    ImageFolder walk lists them (sorted relative paths)."""
    for i, rel in layout.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        images[i].save(root / rel, format="PNG")
    return sorted(layout, key=lambda i: layout[i])


def expected(logits: torch.Tensor, labels: list[int], valid: tuple[int, ...] | None = None) -> dict:
    """Top-1/top-5 (%), per-class top-1, 15-bin L1 ECE and NLL by hand from full logits (``valid``: the
    logits outside those classes removed before the softmax, images labelled outside them left out)."""
    labels_t = torch.tensor(labels)
    if valid is not None:
        masked = torch.full_like(logits, float("-inf"))
        masked[:, list(valid)] = logits[:, list(valid)]
        keep = torch.tensor([lab in valid for lab in labels])
        logits, labels_t = masked[keep], labels_t[keep]
    probs = logits.double().softmax(-1)
    top5 = probs.topk(5, -1).indices
    hit1, hit5 = top5[:, 0] == labels_t, (top5 == labels_t[:, None]).any(1)
    conf = probs.max(-1).values
    ece = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        inside = (conf >= lo) & (conf < hi) if b < 14 else (conf >= lo)
        if inside.any():
            ece += float(inside.double().mean() * (hit1[inside].double().mean() - conf[inside].mean()).abs())
    per_class = {int(c): float(hit1[labels_t == c].double().mean() * 100) for c in labels_t.unique()}
    return {"top1": float(hit1.double().mean() * 100), "top5": float(hit5.double().mean() * 100), "ece": ece,
            "nll": float(-probs[torch.arange(len(labels_t)), labels_t].log().mean()), "per_class": per_class,
            "n": len(labels_t), "top5_ids": top5, "top5_probs": probs.topk(5, -1).values}


def check_scores(res: dict, want: dict) -> None:
    assert res["num_images"] == want["n"]
    assert res["top1"] == pytest.approx(want["top1"]) and res["top5"] == pytest.approx(want["top5"])
    assert res["ece"] == pytest.approx(want["ece"], abs=1e-5) and res["nll"] == pytest.approx(want["nll"], abs=1e-4)
    table = pd.read_csv(res["per_class_csv"])
    assert dict(zip(table["class_index"], table["top1"])) == pytest.approx(want["per_class"])
    assert res["mean_class_top1"] == pytest.approx(np.mean(list(want["per_class"].values())))
    assert Path(res["reliability_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def evaluate(ckpt, data, out: Path, *extra) -> dict:
    assert main(["eval", "imagenet", *MODEL_ARGS, "--checkpoint", str(ckpt), "--data", str(data), "--batch-size", "5",
                 "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_v2_index_folders_are_the_labels(tmp_path, pool, capsys):
    """ImageNet-V2's folders 0..999 label by number: "10" and "100" sort before "2", and the old sorted
    labels scored a different top-1 (with a warning)."""
    ckpt, images, logits = pool
    top1 = logits.argmax(-1).tolist()
    labels = [top1[i] if i % 2 == 0 else (2, 10, 100)[i % 3] for i in range(N)]
    order = place(tmp_path / "v2", images, {i: f"{labels[i]}/{i:02d}.png" for i in range(N)})
    res = evaluate(ckpt, tmp_path / "v2", tmp_path / "v2.json")
    assert "WARNING" not in capsys.readouterr().err
    assert res["label_source"] == "folder_index"
    check_scores(res, expected(logits[order], [labels[i] for i in order]))
    assert res["top1"] >= 50


@pytest.mark.parametrize("folders", [("3", "cat"), ("3", "1000"), ("03", "4")])
def test_other_folder_names_keep_sorted_labels_and_the_warning(tmp_path, pool, capsys, folders):
    ckpt, images, _ = pool
    place(tmp_path / "d", images, {i: f"{folders[i % 2]}/{i}.png" for i in range(4)})
    res = evaluate(ckpt, tmp_path / "d", tmp_path / "d.json")
    assert res["label_source"] == "sorted_class_dirs" and "WARNING" in capsys.readouterr().err


def test_real_labels_scored_as_timm_scores_them(tmp_path, pool):
    """ReaL: right at top-k when any of the top-k ids is a ReaL label; empty lists left out; a file the
    json does not name is counted, not scored. Reference: timm's RealLabelsImagenet on the full logits."""
    from timm.data import RealLabelsImagenet

    ckpt, images, logits = pool
    top5 = logits.topk(6, -1).indices.tolist()
    n = 12
    real = []
    for k in range(n):
        real.append([[top5[k][0]], [top5[k][3], 999 - top5[k][0] % 7], [], [top5[k][5]]][k % 4])
    (tmp_path / "real.json").write_text(json.dumps(real))
    layout = {k: f"{WNIDS[k % 3]}/ILSVRC2012_val_{k + 1:08d}.JPEG" for k in range(n)}
    layout[5] = f"{WNIDS[5 % 3]}/ILSVRC2012_val_00000006_{WNIDS[5 % 3]}.JPEG"  # Hugging Face's names
    layout[n] = f"{WNIDS[0]}/not_in_real.png"
    order = place(tmp_path / "val", images, layout)
    res = evaluate(ckpt, tmp_path / "val", tmp_path / "r.json", "--real-labels", str(tmp_path / "real.json"))
    names = [f"ILSVRC2012_val_{k + 1:08d}.JPEG" for k in range(n)]
    reference = RealLabelsImagenet(names, real_json=str(tmp_path / "real.json"))
    reference.add_result(logits[:n])
    assert res["real_top1"] == pytest.approx(reference.get_accuracy(1))
    assert res["real_top5"] == pytest.approx(reference.get_accuracy(5))
    assert 0 < res["real_top1"] < res["real_top5"] < 100
    assert (res["real_num_images"], res["real_num_empty"], res["real_num_unmatched"]) == (9, 3, 1)
    check_scores(res, expected(logits[order], [WNIDS.index(layout[i].split("/")[0]) for i in order]))


@pytest.mark.parametrize("topk, top5_is", [("3", "nan"), ("10", "top5")])
def test_top5_is_the_top_5_whatever_the_topk(tmp_path, pool, topk, top5_is):
    """--topk 3 left top5 the top-3 figure and --topk 10 the top-10 one; now NaN, and the top-5."""
    ckpt, images, logits = pool
    top = logits.topk(10, -1).indices.tolist()
    labels = [top[i][[0, 4, 7, 2][i % 4]] for i in range(N)]  # right at top-1, top-5, only top-10, top-3
    order = place(tmp_path / "val", images, {i: f"{WNIDS[labels[i]]}/{i:02d}.png" for i in range(N)})
    res = evaluate(ckpt, tmp_path / "val", tmp_path / "t.json", "--topk", topk)
    want = expected(logits[order], [labels[i] for i in order])
    assert res["top1"] == pytest.approx(want["top1"])
    if top5_is == "nan":
        assert np.isnan(res["top5"]) and pd.read_csv(res["per_class_csv"])["top5"].isna().all()
    else:
        assert res["top5"] == pytest.approx(want["top5"]) == 75.0


def test_real_names():
    from nested_svit.data.testset_labels import real_name

    assert real_name("val/n01440764/ILSVRC2012_val_00000001.JPEG") == "ILSVRC2012_val_00000001.JPEG"
    assert real_name("ILSVRC2012_val_00049999_n01751748.jpeg") == "ILSVRC2012_val_00049999.JPEG"
    assert real_name("ILSVRC2012_val_000000011.JPEG") is None and real_name("x/ILSVRC2012_train_1.JPEG") is None


def test_the_official_real_json_reads():
    real = read_real_labels(TIMM_INFO / "imagenet_real_labels.json")  # the file timm ships (Beyer et al.)
    assert len(real) == 50000 and real["ILSVRC2012_val_00000002.JPEG"] == (970, 795)
    assert sum(not v for v in real.values()) == 3163


def test_named_sets_are_the_published_lists():
    for name, stem in (("imagenet-a", "imagenet_a"), ("imagenet-r", "imagenet_r")):
        published = [int(v) for v in (TIMM_INFO / f"{stem}_indices.txt").read_text().split()]
        assert list(valid_labels(name, 1000)) == published
        assert list(subset_wnids(name)) == (TIMM_INFO / f"{stem}_synsets.txt").read_text().split()


def test_predict_valid_labels_file_restricts_softmax_and_topk(tmp_path, pool):
    ckpt, images, logits = pool
    top1 = logits.argmax(-1).tolist()
    valid = sorted(set(top1[::3]) | set(range(400, 430)))
    (tmp_path / "valid.txt").write_text("# a subset\n" + "\n".join(map(str, reversed(valid))) + "\n")
    order = place(tmp_path / "flat", images, {i: f"{i:02d}.png" for i in range(N)})
    out = tmp_path / "p.parquet"
    assert main(["predict", *MODEL_ARGS, "--checkpoint", str(ckpt), "--input", str(tmp_path / "flat"), "--out", str(out),
                 "--valid-labels", str(tmp_path / "valid.txt")]) == 0
    rows = pd.read_parquet(out)
    masked = torch.full_like(logits, float("-inf"))
    masked[:, valid] = logits[:, valid]
    probs = masked[order].double().softmax(-1)
    ids = rows[[f"top{r}_id" for r in range(1, 6)]].to_numpy()
    assert (ids == probs.topk(5, -1).indices.numpy()).all() and np.isin(ids, valid).all()
    assert rows[[f"top{r}_prob" for r in range(1, 6)]].to_numpy() == pytest.approx(
        probs.topk(5, -1).values.numpy(), abs=1e-5)  # batched fp32 vs per-image, logits x30
    assert rows["label_prob"].isna().all()  # no labels: no label probability


def test_eval_valid_labels_named_set_scores_the_200_classes(tmp_path, pool):
    """imagenet-r on val-like data: the top-k over R's 200 classes; images of other classes not scored."""
    ckpt, images, logits = pool
    r = valid_labels("imagenet-r", 1000)
    masked_top1 = [max(r, key=lambda c: float(logits[i, c])) for i in range(N)]
    labels = [masked_top1[i] if i % 3 == 0 else (r[i] if i % 3 == 1 else 0) for i in range(N)]  # 0: not in R
    assert 0 not in r
    order = place(tmp_path / "val", images, {i: f"{WNIDS[labels[i]]}/{i:02d}.png" for i in range(N)})
    res = evaluate(ckpt, tmp_path / "val", tmp_path / "v.json", "--valid-labels", "imagenet-r")
    check_scores(res, expected(logits[order], [labels[i] for i in order], r))
    assert res["num_outside_valid_labels"] == sum(lab == 0 for lab in labels) and res["top1"] > 0
    assert res["valid_labels"] == "imagenet-r" and res["num_valid_labels"] == 200


def test_folders_of_exactly_imagenet_r_get_a_note_and_no_mask(tmp_path, pool, capsys):
    ckpt, images, _ = pool
    place(tmp_path / "r", images * 13, {i: f"{w}/{i}.png" for i, w in enumerate(subset_wnids("imagenet-r"))})
    out = tmp_path / "p.parquet"
    assert main(["predict", *MODEL_ARGS, "--checkpoint", str(ckpt), "--input", str(tmp_path / "r"), "--out", str(out),
                 "--batch-size", "100"]) == 0
    err = capsys.readouterr().err
    assert "exactly imagenet-r's 200 classes" in err and "--valid-labels imagenet-r" in err
    assert not pd.read_parquet(out)["top1_id"].isin(valid_labels("imagenet-r", 1000)).all()  # not masked


@pytest.mark.parametrize("flags, message", [
    (["--valid-labels", "{tmp}/bad.txt"], "index 1000 (line 2) is outside the model's 1000 classes"),
    (["--valid-labels", "imagenet-x"], "not a named set (imagenet-a, imagenet-r)"),
    (["--real-labels", "{tmp}/real.json"], "no file of"),
    (["--real-labels", "{tmp}/real.json", "--num-classes", "10"], "ReaL labels are ImageNet-1k class indices"),
    (["--data", "two={tmp}/val:valid=imagenet-y"], "not a named set"),
    (["--data", "two={tmp}/val:valid="], "the valid-labels value is empty"),
    (["--valid-labels", ""], "the valid-labels value is empty"),
])
def test_bad_scoring_input_is_one_line_before_any_image(tmp_path, pool, capsys, flags, message):
    ckpt, images, _ = pool
    place(tmp_path / "val", images, {0: f"{WNIDS[0]}/a.png"})
    (tmp_path / "bad.txt").write_text("3\n1000\n")
    (tmp_path / "real.json").write_text("[[1], [2]]")
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    data = f"one={tmp_path / 'val'}" if "--data" in flags else str(tmp_path / "val")  # two sets: the second's fault
    code = main(["eval", "imagenet", *MODEL_ARGS, "--random-weights", "--data", data, *flags,
                 "--out", str(tmp_path / "o.json")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not list(tmp_path.glob("o.json*.parts")) or not list(tmp_path.glob("o.json*.parts/batch-*"))


def _multi_args(tmp_path: Path, ckpt) -> list[str]:
    return ["eval", "imagenet", *MODEL_ARGS, "--checkpoint", str(ckpt), "--batch-size", "2",
            "--data", f"val={tmp_path / 'val'}", "--data", f"v2={tmp_path / 'v2'}",
            "--data", f"r={tmp_path / 'r'}:valid=imagenet-r"]


def _write_sets(tmp_path: Path, images, logits) -> dict:
    """val (wnid folders), v2 (index folders), r (R's wnids, scored over R's 200): -> the expected scores."""
    r = valid_labels("imagenet-r", 1000)
    val_labels = {i: i % 3 for i in range(6)}
    v2_labels = {i: int(logits[i].argmax()) if i % 2 else 5 for i in range(6, 12)}
    r_labels = {i: r[i] for i in range(12, N)}
    want = {}
    for name, (labels, valid) in {"val": (val_labels, None), "v2": (v2_labels, None), "r": (r_labels, r)}.items():
        folder = (lambda c: str(c)) if name == "v2" else (lambda c: WNIDS[c])
        order = place(tmp_path / name, images, {i: f"{folder(c)}/{i:02d}.png" for i, c in labels.items()})
        want[name] = expected(logits[order], [labels[i] for i in order], valid)
    return want


def test_several_sets_in_one_run_in_timm_columns(tmp_path, pool):
    ckpt, images, logits = pool
    want = _write_sets(tmp_path, images, logits)
    out = tmp_path / "sets.json"
    assert main([*_multi_args(tmp_path, ckpt), "--out", str(out)]) == 0
    results = json.loads(out.read_text())["sets"]
    assert [s["dataset"] for s in results] == ["val", "v2", "r"]
    for res in results:
        check_scores(res, want[res["dataset"]])
    table = pd.read_csv(out.with_suffix(".csv"))
    assert list(table.columns[:10]) == ["model", "img_size", "top1", "top1_err", "top5", "top5_err", "param_count",
                                        "crop_pct", "interpolation", "dataset"]
    assert table["dataset"].tolist() == ["val", "v2", "r"] and table["top1_err"].tolist() == pytest.approx(
        [100 - want[n]["top1"] for n in ("val", "v2", "r")])
    # diffs against the first set over the same classes, as timm's; none for that set itself
    assert table["diff_to"].fillna("").tolist() == ["", "val", ""]
    assert table["top1_diff"].isna().tolist() == [True, False, True]
    assert table["top1_diff"][1] == pytest.approx(want["v2"]["top1"] - want["val"]["top1"])
    assert (table["param_count"] > 5).all() and (table["img_size"] == 64).all()
    assert not list(tmp_path.glob("sets.json*.parts"))


@pytest.mark.slow
def test_several_sets_resume_after_a_kill(tmp_path, pool, kill_midway):
    ckpt, images, logits = pool
    want = _write_sets(tmp_path, images, logits)
    out = tmp_path / "sets.json"
    parts = tmp_path / "sets.json.v2.parts"
    killed = kill_midway(cli_command(*_multi_args(tmp_path, ckpt), "--out", str(out)), parts, 1, timeout=120)
    assert killed and not out.exists(), "the run should have been killed in its second set"
    assert subprocess.run(cli_command(*_multi_args(tmp_path, ckpt), "--out", str(out)), capture_output=True).returncode == 0
    resumed = json.loads(out.read_text())["sets"]
    assert resumed[0]["images_this_run"] == 0  # the first set was finished before the kill: not run again
    for res in resumed:
        check_scores(res, want[res["dataset"]])
    assert not list(tmp_path.glob("sets.json*.parts"))
    clean = tmp_path / "clean.json"
    assert main([*_multi_args(tmp_path, ckpt), "--out", str(clean)]) == 0
    timing = {"images_per_sec", "images_this_run", "per_class_csv", "reliability_png"}
    for a, b in zip(resumed, json.loads(clean.read_text())["sets"]):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    csv = [pd.read_csv(p.with_suffix(".csv")).drop(columns=["images_per_sec", "images_this_run", "per_class_csv",
                                                            "reliability_png"]) for p in (out, clean)]
    pd.testing.assert_frame_equal(*csv)


@pytest.mark.parametrize("text, parsed", [
    ("/data/val", (None, "/data/val", None, None)),
    ("val=/data/val", ("val", "/data/val", None, None)),
    ("r=/data/r:valid=imagenet-r", ("r", "/data/r", None, "imagenet-r")),
    ("val=/d/val:real=/d/real.json:valid=none", ("val", "/d/val", "/d/real.json", "none")),
    ("/d/a=b/val", (None, "/d/a=b/val", None, None)),
])
def test_data_syntax(text, parsed):
    from nested_svit.cli.sets import parse_data_set

    s = parse_data_set(text)
    assert (s.name, s.path, s.real, s.valid) == parsed


def test_results_table_diffs_against_the_first_set_over_the_same_classes():
    """timm's files: V2 against val, A against A-clean (val over A's 200 classes)."""
    from nested_svit.evaluation.testset_figures import results_table

    def result(name, top1, top5, valid=None):
        return {"model": "m", "dataset": name, "top1": top1, "top5": top5, "valid_labels": valid, "param_count": 1.5,
                "transform": {"img_size": 224, "crop_pct": 0.875, "interpolation": "bicubic"}, "nested": {"x": 1}}

    nan = float("nan")
    table = results_table([result("unlabelled", nan, nan), result("val", 80.0, 95.0),
                           result("a-clean", 94.0, 99.0, "imagenet-a"), result("v2", 69.0, 88.5),
                           result("a", 18.0, 50.0, "imagenet-a")])
    # a set is not diffed against itself, and a set without labelled images (top-1 NaN) is no base
    assert table["diff_to"].fillna("").tolist() == ["", "", "", "val", "a-clean"]
    assert table["top1_diff"].tolist()[3:] == pytest.approx([-11, -76]) and table["top1_diff"][:3].isna().all()
    assert table["top5_diff"].tolist()[3:] == pytest.approx([-6.5, -49])
    assert table["top1_err"].tolist()[1:] == pytest.approx([20, 6, 31, 82]) and "nested" not in table


@pytest.mark.slow
def test_several_sets_under_torchrun_equal_one_process(tmp_path, pool, torchrun):
    ckpt, images, logits = pool
    place(tmp_path / "val", images, {i: f"{WNIDS[i % 3]}/{i:02d}.png" for i in range(7)})
    place(tmp_path / "v2", images, {i: f"{(0, 2, 10)[i % 3]}/{i:02d}.png" for i in range(7, N)})
    args = ["eval", "imagenet", *MODEL_ARGS[:-2], "--threads", "1", "--checkpoint", str(ckpt), "--batch-size", "3",
            "--data", f"val={tmp_path / 'val'}", "--data", f"v2={tmp_path / 'v2'}:valid={tmp_path / 'valid.txt'}"]
    (tmp_path / "valid.txt").write_text("\n".join(map(str, range(0, 1000, 2))))
    assert main([*args, "--out", str(tmp_path / "one.json")]) == 0
    run = torchrun("-m", "nested_svit.cli", *args, "--out", str(tmp_path / "two.json"), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["sets"] for n in ("one", "two"))
    assert [s["world_size"] for s in two] == [2, 2]
    for a, b in zip(one, two):
        for key in ("dataset", "top1", "top5", "num_images", "ece", "nll", "mean_class_top1", "mean_keep_ratio"):
            assert a[key] == pytest.approx(b[key]), key
    assert pd.read_csv(tmp_path / "two.csv")["dataset"].tolist() == ["val", "v2"]
