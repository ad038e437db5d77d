"""Every run tells the truth (issue 26): one regression test per item, each against an independent
reference (the model run directly, a hand-computed value, the file as written), each failing on the code
before the change. Tiny models (the bundled 32-px digits ViT) keep the file fast."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from datasets_fixtures import make_image
from nested_svit import create_model, load_checkpoint
from nested_svit.cli import main

ASSETS = resources.files("nested_svit.assets")
DIGITS = Path(str(ASSETS / "digits_samples"))  # one folder per digit 0..9, two PNGs each
DIGITS_PTH = str(ASSETS / "svit_digits.pth")  # a plain state dict of the trained digits SViT
RUN = ["--workers", "0", "--threads", "1"]
TINY = ["--model", "svit_tiny", "--random-weights", "--img-size", "32", *RUN]


@pytest.fixture(scope="module")
def named_digits(tmp_path_factory) -> Path:
    """The trained digits SViT in our file schema with its class names '0'..'9', as ``train`` writes it."""
    from nested_svit.checkpoint import save_checkpoint

    model = create_model("svit_digits")
    load_checkpoint(model, DIGITS_PTH)
    model.class_names = [str(i) for i in range(10)]
    path = tmp_path_factory.mktemp("named") / "digits.pth"
    save_checkpoint(model, path)
    return path


def _digit_folders(root: Path, digits: list[str]) -> Path:
    for d in digits:
        shutil.copytree(DIGITS / d, root / d)
    return root


def _direct_top1(rows: pd.DataFrame, names: list[str]) -> float:
    """The reference: the model run on each image by itself, scored against its folder name."""
    from nested_svit.data import EvalTransform
    from nested_svit.data.decode import decode_image

    model = create_model("svit_digits").eval()
    load_checkpoint(model, DIGITS_PTH)
    t = EvalTransform(img_size=32, crop_pct=1.0)
    right = []
    for image_id in rows["id"]:
        x = t(decode_image(str(DIGITS / image_id)))[None]
        with torch.no_grad():
            right.append(names[int(model(x).argmax())] == Path(image_id).parts[0])
    return 100 * float(np.mean(right))


# ---------------------------------------------------------------- 1. labels by the model's class names
def test_1_folders_are_labelled_by_the_model_class_names(tmp_path, named_digits, capsys):
    data = _digit_folders(tmp_path / "val", ["3", "7"])
    out = tmp_path / "r.json"
    assert main(["eval", "imagenet", "--checkpoint", str(named_digits), "--data", str(data), "--out", str(out),
                 *RUN]) == 0
    result = json.loads(out.read_text())
    assert result["label_source"] == "model_class_names"
    predicted = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(named_digits), "--input", str(data), "--out", str(predicted),
                 *RUN]) == 0
    rows = pd.read_csv(predicted)
    assert (rows["label"] == rows["id"].str[0].astype(int)).all() and set(rows["label"]) == {3, 7}
    assert result["top1"] == pytest.approx(_direct_top1(rows, [str(i) for i in range(10)]))
    assert result["top1"] > 0  # was 0.00: folders 3 and 7 had become labels 0 and 1


def test_1_a_folder_that_is_not_a_class_is_an_error_or_unlabelled(tmp_path, named_digits, capsys):
    data = _digit_folders(tmp_path / "val", ["3"])
    shutil.copytree(DIGITS / "7", data / "seven")
    args = ["eval", "imagenet", "--checkpoint", str(named_digits), "--data", str(data), *RUN]
    assert main([*args, "--out", str(tmp_path / "a.json")]) == 2
    assert "seven" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b.json"), "--ignore-unknown-classes"]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    sevens = len(list((DIGITS / "7").iterdir()))
    assert result["num_images"] == 2 and result["num_predicted"] == 2 + sevens  # those in seven/ are not scored
    assert "seven" in capsys.readouterr().err


def test_1_sorted_folder_labels_are_warned_for_every_class_count(tmp_path, capsys):
    data = tmp_path / "val"
    shutil.copytree(DIGITS / "3", data / "three")
    shutil.copytree(DIGITS / "7", data / "seven")
    assert main(["eval", "imagenet", "--model", "svit_digits", "--checkpoint", DIGITS_PTH, "--data", str(data),
                 "--out", str(tmp_path / "r.json"), *RUN]) == 0
    err = capsys.readouterr().err
    assert "sorted folder order" in err and "0: seven" in err and "--class-names" in err


def test_1_folders_named_by_class_index_are_those_classes(tmp_path, capsys):
    """Folders that are all class numbers below the class count (ImageNet-V2's 0..999) are those classes
    (issue 23): 3/ and 7/ of the digits model are classes 3 and 7, not the sorted 0 and 1, and no warning."""
    data = _digit_folders(tmp_path / "val", ["3", "7"])
    assert main(["eval", "imagenet", "--model", "svit_digits", "--checkpoint", DIGITS_PTH, "--data", str(data),
                 "--out", str(tmp_path / "r.json"), *RUN]) == 0
    assert "WARNING" not in capsys.readouterr().err
    result = json.loads((tmp_path / "r.json").read_text())
    rows = pd.read_csv(result["per_class_csv"])
    assert result["label_source"] == "folder_index" and rows["class_index"].tolist() == [3, 7]
    predicted = tmp_path / "p.csv"
    assert main(["predict", "--model", "svit_digits", "--checkpoint", DIGITS_PTH, "--input", str(data),
                 "--out", str(predicted), *RUN]) == 0
    assert result["top1"] == pytest.approx(_direct_top1(pd.read_csv(predicted), [str(i) for i in range(10)]))
    assert result["top1"] > 0


# ---------------------------------------------------------------- 2. loose photos beside a class folder
def test_2_the_summary_says_how_many_images_are_labelled(tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    for i in range(4):
        make_image(rng, size=(40, 40)).save(root / f"loose{i}.png")
    make_image(rng, size=(40, 40)).save(root / "cats" / "a.png")
    assert main(["eval", "imagenet", *TINY, "--data", str(root), "--out", str(tmp_path / "r.json")]) == 0
    captured = capsys.readouterr()
    assert "on 1 labelled of 5 images" in captured.out
    assert "4 images at its top, outside its 1 class folder" in captured.err


# ---------------------------------------------------------------- 3. a resumed predict never mixes two runs
@pytest.mark.parametrize("changed", [["--class-names", "{names}"], ["--max-image-pixels", "100000"],
                                     ["--backend", "padded"], ["--threads", "2"]])
def test_3_resume_refuses_a_run_that_changed_what_rows_hold(tmp_path, changed, capsys):
    from nested_svit.cli import build_parser, options
    from nested_svit.cli.models import class_names_file, model_spec
    from nested_svit.cli.runs import data_options, run_options
    from nested_svit.inference import OutputOptions, classifier_job

    data = _digit_folders(tmp_path / "val", ["1", "2"])
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


def test_3_rerunning_a_finished_out_says_it_recomputes(tmp_path, capsys):
    data = _digit_folders(tmp_path / "val", ["1"])
    args = ["predict", *TINY, "--input", str(data), "--out", str(tmp_path / "p.csv")]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--topk", "2"]) == 0
    assert "computed again" in capsys.readouterr().err


# ---------------------------------------------------------------- 4. train resume refuses a changed run
@pytest.mark.slow
def test_4_train_resume_refuses_other_settings_or_data_and_allows_more_epochs(tmp_path, capsys):
    a = _digit_folders(tmp_path / "a", ["2", "6", "8"])  # 10 images: 5 steps of 2 an epoch
    b = _digit_folders(tmp_path / "b", ["2", "3"])
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


# ---------------------------------------------------------------- 5. earlier outputs are never input
def test_5_earlier_pictures_predictions_and_parts_are_not_read_back(tmp_path, capsys):
    data = _digit_folders(tmp_path / "photos", ["4"])
    first = ["predict", *TINY, "--input", str(data)]
    assert main([*first, "--out", str(data / "preds.parquet"), "--save-vis", str(data / "vis")]) == 0
    user_parts = data / "holiday.parts"  # a user's folder that only looks like ours
    shutil.copytree(DIGITS / "5", user_parts)
    capsys.readouterr()
    assert main([*first, "--out", str(tmp_path / "again.csv")]) == 0
    rows = pd.read_csv(tmp_path / "again.csv")
    err = capsys.readouterr().err
    assert sorted(rows["id"]) == sorted(["4/" + p.name for p in (DIGITS / "4").iterdir()] +
                                        ["holiday.parts/" + p.name for p in (DIGITS / "5").iterdir()])
    assert "earlier nested-svit" in err  # the pictures and the parquet are listed as ignored


def test_5_a_stray_parquet_in_a_folder_of_images_keeps_it_a_folder_of_images(tmp_path):
    data = _digit_folders(tmp_path / "photos", ["4"])
    pd.DataFrame({"x": [1, 2]}).to_parquet(data / "stray.parquet")
    assert main(["predict", *TINY, "--input", str(data), "--out", str(tmp_path / "p.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "p.csv")) == len(list((DIGITS / "4").iterdir()))


# ---------------------------------------------------------------- 6. the pixel limit is not corruption
def test_6_a_size_limit_says_so_and_zero_limits_are_argument_errors(tmp_path, capsys):
    data = tmp_path / "big"
    data.mkdir()
    make_image(np.random.default_rng(0), size=(583, 502)).save(data / "wide.png")
    make_image(np.random.default_rng(1), size=(40, 40)).save(data / "small.png")
    assert main(["predict", *TINY, "--input", str(data), "--out", str(tmp_path / "p.csv"),
                 "--max-image-pixels", "100000"]) == 0
    reason = pd.read_csv(tmp_path / "p.csv").set_index("id").loc["wide.png", "error"]
    assert "583x502 = 292,666 pixels" in reason and "100,000" in reason and "size limit" in reason
    assert "corrupt" not in reason and "cannot decode" not in reason
    for flag in ("--max-image-pixels", "--threads"):
        capsys.readouterr()
        assert main(["predict", "--model", "svit_tiny", "--random-weights", "--input", str(data),
                     "--out", str(tmp_path / "q.csv"), flag, "0"]) == 2
        assert f"{flag} must be >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------- 7. every image skipped is a failure
def test_7_a_run_where_every_image_was_skipped_exits_non_zero(tmp_path, capsys):
    data = tmp_path / "bad"
    data.mkdir()
    (data / "a.jpg").write_bytes(b"not a jpeg")
    (data / "b.png").write_bytes(b"\x89PNG broken")
    assert main(["predict", *TINY, "--input", str(data), "--out", str(tmp_path / "p.csv")]) == 2
    assert "every one of the 2 images was skipped" in capsys.readouterr().err
    assert len(pd.read_csv(tmp_path / "p.csv")) == 2  # the rows with the reasons are still written
    assert main(["eval", "imagenet", *TINY, "--data", str(data), "--out", str(tmp_path / "r.json")]) == 2


# ---------------------------------------------------------------- 8. the EXIF orientation found
def test_8_orientation_records_the_exif_tag_found(tmp_path):
    data = tmp_path / "phone"
    data.mkdir()
    img = make_image(np.random.default_rng(0), size=(48, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(data / "rotated.jpg", exif=exif)
    img.save(data / "plain.jpg")
    for decode in ("cpu", "gpu"):  # the device decoder's rows too
        out = tmp_path / f"{decode}.csv"
        assert main(["predict", *TINY, "--input", str(data), "--out", str(out), "--decode", decode]) == 0
        rows = pd.read_csv(out).set_index("id")
        assert rows.loc["rotated.jpg", "orientation"] == 6 and pd.isna(rows.loc["plain.jpg", "orientation"])
        # applied where the file was turned by its tag, not the run's setting on every row
        assert rows.loc["rotated.jpg", "exif_applied"] and not rows.loc["plain.jpg", "exif_applied"]


# ---------------------------------------------------------------- 9. one FLOP convention, named
def test_9_bench_reports_multiply_adds_as_the_paper(tmp_path):
    from nested_svit.benchmark import BenchConfig, run_benchmark

    df = run_benchmark(BenchConfig(models=["deit_small_patch16_224"], batch_sizes=[1], rounds=1, min_time=0,
                                   warmup=0))
    assert "gflops_per_image" not in df.columns
    assert df["gmacs_per_image"].iloc[0] == pytest.approx(4.6, abs=0.05)  # DeiT-S: 4.6 GMACs (the paper's)


# ---------------------------------------------------------------- 10. train files are ours
def test_10_train_files_report_their_own_format(tmp_path, named_digits):
    model = create_model("svit_digits")
    assert load_checkpoint(model, named_digits).format == "nested_svit"
    assert load_checkpoint(model, DIGITS_PTH).format == "timm"  # a plain state dict stays timm's


# ---------------------------------------------------------------- 11. Ray's noise on stderr
@pytest.mark.slow
def test_11_ray_actor_argument_noise_is_filtered_and_nothing_else(tmp_path):
    """The core worker's line (as Ray 2.60 writes it, on the progress bar's line) is dropped; the bar and
    every other line pass through."""
    noise = ("[2026-12-03 14:07:11,542 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker(X)' and ID: "
             "'ab' has constructor arguments in the object store and max_restarts > 0. If the arguments in the object "
             "store go out of scope or are lost, the actor restart will fail. See "
             "https://github.com/ray-project/ray/issues/53727 for more details.\n")
    script = tmp_path / "noise.py"
    script.write_text("import os, sys\nfrom nested_svit.ray.quiet import without_actor_argument_noise\n"
                      "with without_actor_argument_noise():\n"
                      f"    os.write(2, b'bar 10%' + {noise.encode()!r})\n"
                      "    print('a real error', file=sys.stderr)\n")
    err = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stderr
    assert err == "bar 10%a real error\n"


# ---------------------------------------------------------------- 12. Ray's default threads
def test_12_ray_actors_default_to_the_local_threads_or_say_why_not():
    from nested_svit.cli import build_parser, options
    from nested_svit.cli.engine import ray_threads, threads_note

    def parsed(*extra):
        return options.resolve(build_parser().parse_args(["predict", "--input", ".", "--engine", "ray", *extra]),
                               "classifier", None)

    local = torch.get_num_threads()
    assert ray_threads(parsed()) == min(local, max(2, os.cpu_count() or 2))
    assert threads_note(parsed()) == [] or ray_threads(parsed()) != local
    note = threads_note(parsed("--cpus-per-actor", str(local + 1)))
    assert note and "last bits" in note[0] and f"--cpus-per-actor {local}" in note[0]


# ---------------------------------------------------------------- 14. provenance in every output
def test_14_predict_outputs_carry_provenance_and_eval_records_the_version(tmp_path, named_digits, capsys):
    import pyarrow.parquet as pq

    data = _digit_folders(tmp_path / "val", ["2"])
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


def test_14_a_calibrated_file_says_it_was_calibrated(tmp_path):
    data = _digit_folders(tmp_path / "val", ["2", "3"])
    cal = tmp_path / "cal.pth"
    assert main(["predict", "--model", "svit_digits", "--checkpoint", DIGITS_PTH, "--input", str(data), *RUN,
                 "--out", str(tmp_path / "p.csv"), "--calibrate", "4", "--keep-targets", "0.5",
                 "--save-calibrated", str(cal)]) == 0
    report = load_checkpoint(create_model("svit_digits"), cal)
    assert any("calibrated" in n and "4 images" in n for n in report.notes)


# ---------------------------------------------------------------- 15. a model from a file
def test_15_load_model_and_load_detector_build_what_the_file_describes(tmp_path, named_digits, tiny_detector_file):
    import nested_svit

    model = nested_svit.load_model(named_digits)
    assert model.name == "svit_digits" and model.class_names == [str(i) for i in range(10)] and not model.training
    reference = create_model("svit_digits").eval()
    load_checkpoint(reference, DIGITS_PTH)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    assert nested_svit.load_model(DIGITS_PTH).name == "svit_digits"  # a plain state dict: the model of its shape
    det = nested_svit.load_detector(tiny_detector_file)
    assert det.class_names == ("square", "bar") and det.config.img_scale == (192, 128)


# ---------------------------------------------------------------- 16. bench a trained model
def test_16_bench_checkpoint_measures_the_model_with_its_own_gates(tmp_path, named_digits):
    out = tmp_path / "b.csv"
    assert main(["bench", "--checkpoint", str(named_digits), "--input", str(DIGITS), "--batch-sizes", "4",
                 "--rounds", "1", "--min-time", "0", "--warmup", "0", "--out", str(out), "--plot", ""]) == 0
    rows = pd.read_csv(out).set_index("model")
    assert set(rows.index) == {"svit_digits", "vit_digits"}
    assert pd.isna(rows.loc["svit_digits", "calibrated_gates"]) and rows.loc["svit_digits", "checkpoint"] == str(named_digits)
    # the reference: the trained model on the same images (the harness's pool: the first 4 of --input)
    from nested_svit.data.dataset import load_images_from_dir

    import nested_svit

    model = nested_svit.load_model(named_digits)
    with torch.no_grad():
        _, usage = model.forward_features(load_images_from_dir(DIGITS, 4, 32), return_usage=True)
    gated = list(model.config.gate_blocks)
    assert rows.loc["svit_digits", "mean_kept_tokens"] == pytest.approx(float(usage.kept[:, gated].double().mean()))


# ---------------------------------------------------------------- 17. a plain state dict without --model
def test_17_a_plain_state_dict_without_model_runs_the_model_of_its_shape_and_says_so(tmp_path, capsys):
    data = _digit_folders(tmp_path / "val", ["1"])
    assert main(["predict", "--checkpoint", DIGITS_PTH, "--input", str(data), "--out", str(tmp_path / "p.csv")]) == 0
    err = capsys.readouterr().err
    assert "state dict of svit_digits's shape: running svit_digits at 32 px, 10 classes" in err
    assert main(["predict", "--checkpoint", DIGITS_PTH, "--model", "svit_digits", "--input", str(data),
                 "--out", str(tmp_path / "q.csv")]) == 0
    found, named = pd.read_csv(tmp_path / "p.csv"), pd.read_csv(tmp_path / "q.csv")
    assert len(found) == 1 and found.drop(columns=["seconds"], errors="ignore").equals(
        named.drop(columns=["seconds"], errors="ignore"))


# ---------------------------------------------------------------- 18. train from random weights says so
def test_18_train_without_init_says_it_starts_from_random_weights(tmp_path, capsys):
    data = _digit_folders(tmp_path / "a", ["0", "1"])
    assert main(["train", "--model", "svit_tiny", "--img-size", "32", "--batch-size", "2", "--epochs", "1", *RUN,
                 "--data", str(data), "--out", str(tmp_path / "t.pth")]) == 0
    err = capsys.readouterr().err
    assert "no --init" in err and "random weights" in err and "lr 1e-05" in err


# ---------------------------------------------------------------- 19. pictures
def test_19_pictures_show_every_gate_by_block_and_rows_link_to_them(tmp_path, capsys):
    from nested_svit.viz import token_usage_picture

    red = np.zeros((224, 224, 3), np.uint8)
    red[..., 0] = 255
    picture = np.asarray(token_usage_picture(red, torch.ones(9, 14, 14, dtype=torch.bool), scale=1,
                                             blocks=range(3, 12), caption="predicted: x"))
    is_red = (picture[..., 0] == 255) & (picture[..., 1] == 0) & (picture[..., 2] == 0)
    assert is_red.sum() >= 224 * 224 + 9 * 104 * 104 * 0.95  # the input and all nine panels, none cut
    data = _digit_folders(tmp_path / "val", ["6"])
    out, vis = tmp_path / "p.csv", tmp_path / "vis"
    assert main(["predict", *TINY, "--input", str(data), "--out", str(out), "--save-vis", str(vis)]) == 0
    rows = pd.read_csv(out)
    assert all((vis / p).is_file() for p in rows["picture"]) and f"pictures in {vis}" in capsys.readouterr().out


# ---------------------------------------------------------------- 20. --help
@pytest.mark.parametrize("command", [["predict"], ["eval", "imagenet"], ["eval", "coco"], ["train"], ["bench"]])
def test_20_help_shows_each_default_once_and_no_bare_none(command, capsys):
    import re

    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = capsys.readouterr().out
    blocks = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    assert not [b for b in blocks if "(default: None)" in b or "None:" in b or b.count("default") > 1]


@pytest.mark.slow
def test_20_the_baselines_table_help_explains_every_option():
    script = Path(__file__).resolve().parents[1] / "eval" / "baselines_table.py"
    text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True).stdout
    options = text.split("options:", 1)[1]
    for flag in ("--out", "--batch-sizes", "--rounds", "--min-time", "--threads"):
        entry = options.split(f"\n  {flag}", 1)[1].split("\n  -", 1)[0]
        assert len(entry.split()) > 4, flag  # a sentence after the metavar, not the metavar alone


# ---------------------------------------------------------------- 21. JSON precision, unicode, integers
@pytest.mark.slow
def test_21_json_keeps_full_precision_unicode_ids_and_integer_columns(tmp_path, tiny_detector_file):
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


def test_21_parquet_inputs_use_the_image_path_or_its_shard_and_row_as_the_id(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    cells = []
    for name in ("cat/a.jpg", "dog/b.jpg", None):
        buf = __import__("io").BytesIO()
        make_image(rng, size=(40, 40)).save(buf, format="PNG")
        cells.append({"bytes": buf.getvalue(), "path": name})
    ds = datasets.Dataset.from_dict({"image": cells}).cast_column("image", datasets.Image())
    ds.to_parquet(str(tmp_path / "shard.parquet"))
    assert main(["predict", *TINY, "--input", str(tmp_path / "shard.parquet"), "--out", str(tmp_path / "p.csv")]) == 0
    # a row without a path is named by its shard and its row there
    assert pd.read_csv(tmp_path / "p.csv")["id"].tolist() == ["cat/a.jpg", "dog/b.jpg", "shard.parquet/2"]
    shards = tmp_path / "shards"
    shards.mkdir()
    plain = datasets.Dataset.from_dict({"image": [{"bytes": c["bytes"], "path": None} for c in cells]}).cast_column(
        "image", datasets.Image())
    plain.select([0, 1]).to_parquet(str(shards / "train-00000-of-00002.parquet"))
    plain.select([2]).to_parquet(str(shards / "train-00001-of-00002.parquet"))
    assert main(["predict", *TINY, "--input", str(shards), "--out", str(tmp_path / "q.csv")]) == 0
    assert pd.read_csv(tmp_path / "q.csv")["id"].tolist() == [
        "train-00000-of-00002.parquet/0", "train-00000-of-00002.parquet/1", "train-00001-of-00002.parquet/0"]
