"""What the outputs hold and how a run resumes: a resumed run never mixes two runs (predict and train),
a finished output is computed again, a run of skipped images fails, provenance in every output,
pictures linked from the rows, JSON at full precision."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from datasets_fixtures import make_image
from digits_fixtures import DIGITS_PTH, RUN, TINY, digit_folders
from nested_svit import create_model, load_checkpoint
from nested_svit.cli import main


@pytest.mark.parametrize("changed", [["--class-names", "{names}"], ["--max-image-pixels", "100000"],
                                     ["--backend", "padded"], ["--threads", "2"]])
def test_resume_refuses_a_run_that_changed_what_rows_hold(tmp_path, changed, capsys):
    from nested_svit.cli import build_parser, options
    from nested_svit.cli.models import class_names_file, model_spec
    from nested_svit.cli.runs import data_options, run_options
    from nested_svit.inference import OutputOptions, classifier_job

    data = digit_folders(tmp_path / "val", ["1", "2"])
    (tmp_path / "names.txt").write_text("\n".join(str(i) for i in range(10)))  # labels 1, 2 instead of 0, 1
    out, parts = tmp_path / "p.csv", tmp_path / "p.csv.parts"
    first = ["predict", "--model", "svit_digits", "--checkpoint", DIGITS_PTH, "--input", str(data), "--out", str(out),
             "--batch-size", "2", *RUN]
    # the parts of an interrupted first run: its run record
    parsed = options.resolve(build_parser().parse_args(first), "classifier", None)
    classifier_job(model_spec(parsed, "classifier"), data_options(parsed, parsed.input, True),
                   run_options(parsed), OutputOptions(str(out)), "predict", topk=parsed.topk,
                   class_names=class_names_file(parsed.class_names)).open()
    assert (parts / "manifest.json").exists()
    again = [a.format(names=tmp_path / "names.txt") for a in changed]
    if "--threads" in again:
        first = [a for a in first if a not in ("--threads", "1")]
    capsys.readouterr()
    assert main([*first, *again]) == 2
    assert "partial results of a different run" in capsys.readouterr().err


def test_rerunning_a_finished_out_says_it_recomputes(tmp_path, capsys):
    data = digit_folders(tmp_path / "val", ["1"])
    args = ["predict", *TINY, "--input", str(data), "--out", str(tmp_path / "p.csv")]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--topk", "2"]) == 0
    assert "computed again" in capsys.readouterr().err


@pytest.mark.slow
def test_train_resume_refuses_other_settings_or_data_and_allows_more_epochs(tmp_path, capsys):
    a = digit_folders(tmp_path / "a", ["2", "6", "8"])  # 10 images: 5 steps of 2 an epoch
    b = digit_folders(tmp_path / "b", ["2", "3"])
    out = tmp_path / "t.pth"
    train = ["train", "--model", "svit_tiny", "--img-size", "32", "--batch-size", "2", "--epochs", "1", *RUN,
             "--out", str(out)]
    assert main([*train, "--data", str(a)]) == 0
    capsys.readouterr()
    assert main([*train, "--data", str(a), "--lr", "0.01"]) == 2
    assert "lr 1e-05 -> 0.01" in capsys.readouterr().err
    assert main([*train, "--data", str(b)]) == 2
    assert "data " in capsys.readouterr().err
    assert main([*train, "--data", str(a), "--batch-size", "4"]) == 2
    assert "batch_size 2 -> 4" in capsys.readouterr().err
    assert main([*train[:-4], "--epochs", "2", *RUN, "--out", str(out), "--data", str(a)]) == 0
    captured = capsys.readouterr()
    assert "started for 1 epochs with --epochs 2" in captured.err
    per_epoch = sum(1 for _ in a.rglob("*.png")) // 2
    # this run's steps, not the file's total
    assert f"trained {per_epoch} steps (steps {per_epoch + 1}-{2 * per_epoch} of {2 * per_epoch})" in captured.out
    saved = torch.load(out, weights_only=True)
    assert saved["data"]["path"] == str(a.resolve()) and len(saved["data"]["digest"]) == 64
    assert saved["train_config"]["lr"] == 1e-5 and saved["global_step"] == 2 * per_epoch


def test_a_run_where_every_image_was_skipped_exits_non_zero(tmp_path, capsys):
    data = tmp_path / "bad"
    data.mkdir()
    (data / "a.jpg").write_bytes(b"not a jpeg")
    (data / "b.png").write_bytes(b"\x89PNG broken")
    assert main(["predict", *TINY, "--input", str(data), "--out", str(tmp_path / "p.csv")]) == 2
    assert "every one of the 2 images was skipped" in capsys.readouterr().err
    assert len(pd.read_csv(tmp_path / "p.csv")) == 2  # the rows with the reasons are still written
    assert main(["eval", "imagenet", *TINY, "--data", str(data), "--out", str(tmp_path / "r.json")]) == 2


def test_predict_outputs_carry_provenance_and_eval_records_the_version(tmp_path, named_digits, capsys):
    import pyarrow.parquet as pq

    data = digit_folders(tmp_path / "val", ["2"])
    out = tmp_path / "p.parquet"
    assert main(["predict", "--checkpoint", str(named_digits), "--input", str(data), "--out", str(out), *RUN]) == 0
    meta = json.loads(pq.read_schema(out).metadata[b"nested_svit"])
    sidecar = json.loads((tmp_path / "p.parquet.meta.json").read_text())
    import hashlib

    digest = hashlib.sha256(Path(named_digits).read_bytes()).hexdigest()
    for m in (meta, sidecar):
        assert m["model"] == "svit_digits" and m["checkpoint_sha256"] == digest and m["transform"]["img_size"] == 32
        assert m["precision"] == "fp32" and m["nested_svit_version"] and m["created"]
    assert " s, " in capsys.readouterr().out.splitlines()[-1]  # "-> out in 0.4 s, 5.0 img/s"
    assert main(["eval", "imagenet", "--checkpoint", str(named_digits), "--data", str(data), *RUN,
                 "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["version"] and "source_commit" in result
    assert "img/s" in capsys.readouterr().out


def test_a_calibrated_file_says_it_was_calibrated(tmp_path):
    data = digit_folders(tmp_path / "val", ["2", "3"])
    cal = tmp_path / "cal.pth"
    assert main(["predict", "--model", "svit_digits", "--checkpoint", DIGITS_PTH, "--input", str(data), *RUN,
                 "--out", str(tmp_path / "p.csv"), "--calibrate", "4", "--keep-targets", "0.5",
                 "--save-calibrated", str(cal)]) == 0
    report = load_checkpoint(create_model("svit_digits"), cal)
    assert any("calibrated" in n and "4 images" in n for n in report.notes)


def test_pictures_show_every_gate_by_block_and_rows_link_to_them(tmp_path, capsys):
    from nested_svit.viz import token_usage_picture

    red = np.zeros((224, 224, 3), np.uint8)
    red[..., 0] = 255
    picture = np.asarray(token_usage_picture(red, torch.ones(9, 14, 14, dtype=torch.bool), scale=1,
                                             blocks=range(3, 12), caption="predicted: x"))
    is_red = (picture[..., 0] == 255) & (picture[..., 1] == 0) & (picture[..., 2] == 0)
    assert is_red.sum() >= 224 * 224 + 9 * 104 * 104 * 0.95  # the input and all nine panels, none cut
    data = digit_folders(tmp_path / "val", ["6"])
    out, vis = tmp_path / "p.csv", tmp_path / "vis"
    assert main(["predict", *TINY, "--input", str(data), "--out", str(out), "--save-vis", str(vis)]) == 0
    rows = pd.read_csv(out)
    assert all((vis / p).is_file() for p in rows["picture"]) and f"pictures in {vis}" in capsys.readouterr().out


@pytest.mark.slow
def test_json_keeps_full_precision_unicode_ids_and_integer_columns(tmp_path, tiny_detector_file):
    data = tmp_path / "photos"
    data.mkdir()
    make_image(np.random.default_rng(0), size=(40, 40)).save(data / "日本.png")
    (data / "broken.png").write_bytes(b"no")
    assert main(["predict", *TINY, "--input", str(data), "--out", str(tmp_path / "p.json")]) == 0
    text = (tmp_path / "p.json").read_text(encoding="utf-8")
    assert "日本.png" in text and "\\u" not in text
    assert main(["predict", *TINY, "--input", str(data), "--out", str(tmp_path / "p.parquet")]) == 0
    exact = pd.read_parquet(tmp_path / "p.parquet").set_index("id")
    loaded = {r["id"]: r for r in json.loads(text)}
    assert loaded["日本.png"]["top1_prob"] == float(exact.loc["日本.png", "top1_prob"])  # every digit
    assert isinstance(loaded["日本.png"]["kept_b0"], int) and loaded["broken.png"]["kept_b0"] is None
    assert main(["predict", "--checkpoint", str(tiny_detector_file), "--input", str(data), *RUN,
                 "--out", str(tmp_path / "d.jsonl")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text(encoding="utf-8").splitlines()]
    ok = next(r for r in lines if r["status"] == "ok")
    assert all(isinstance(ok[k], int) for k in ("height", "width", "num_detections", "total_tokens", "image_id"))
