"""The classification user path: inputs of every kind, argument errors in one line before any work,
resume, our own outputs never read back, image limits, training from the command line."""
from __future__ import annotations

import io
import json
import os
import stat

import numpy as np
import pandas as pd
import pytest
import torch
from datasets_fixtures import WNIDS, encode, make_image, write_image_folder, write_parquet
from PIL import Image

from nested_svit import create_model, load_checkpoint, load_model
from nested_svit.checkpoint import CheckpointError
from nested_svit.cli import main
from nested_svit.data import open_dataset
from nested_svit.data.decode import decode_image

TINY = ["--model", "svit_tiny", "--img-size", "32", "--workers", "0", "--threads", "1", "--random-weights"]


def _digits_folder(root, classes=("zero", "one", "two"), per_class=4, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(rng, size=(32, 32)).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`train --out newdir/x.pth` on a 3-class folder (item 3: the folder does not exist yet)."""
    base = tmp_path_factory.mktemp("train")
    data = _digits_folder(base / "data")
    out = base / "new" / "dir" / "svit.pth"
    assert main(["train", "--model", "svit_digits", "--data", str(data), "--epochs", "1", "--batch-size", "4",
                 "--workers", "0", "--threads", "1", "--out", str(out), "--log-every", "1"]) == 0
    return out, data


def test_train_checkpoint_feeds_predict_eval_library_and_init(trained, tmp_path, capsys):
    """Items 1, 2, 9: weights_only load, config and class names from the file, model-default image size."""
    out, data = trained
    state = torch.load(out, weights_only=True)  # no numpy objects inside
    assert state["model_config"]["img_size"] == 32 and state["model_config"]["num_classes"] == 3  # item 2, defaults
    assert state["class_names"] == ["one", "two", "zero"]
    preds = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(out), "--input", str(data), "--out", str(preds), "--workers", "0"]) == 0
    rows = pd.read_csv(preds)
    assert set(rows["top1_name"]) <= {"one", "two", "zero"} and (rows["label_name"] == rows["id"].str.split("/").str[0]).all()
    assert main(["eval", "imagenet", "--checkpoint", str(out), "--data", str(data), "--out", str(tmp_path / "r.json"),
                 "--workers", "0"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["model"] == "svit_digits"
    model = create_model("svit_digits", num_classes=3)
    load_checkpoint(model, out)  # the library reads the same file
    again = tmp_path / "again.pth"
    assert main(["train", "--model", "svit_digits", "--init", str(out), "--data", str(data), "--epochs", "1",
                 "--batch-size", "4", "--workers", "0", "--out", str(again)]) == 0
    assert main(["train", "--model", "svit_tiny", "--data", str(data), "--epochs", "1", "--batch-size", "4",
                 "--workers", "0", "--out", str(out)]) == 2  # item 6: another model on an existing --out
    assert "svit_digits" in capsys.readouterr().err


def test_train_skips_corrupt_images_and_is_seeded(tmp_path):
    """Items 4 and 17."""
    data = _digits_folder(tmp_path / "data")
    (data / "one" / "bad.png").write_bytes(b"garbage")
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.pth"
        assert main(["train", "--model", "svit_digits", "--data", str(data), "--epochs", "1", "--batch-size", "13",
                     "--workers", "0", "--out", str(out), "--seed", "3"]) == 0
        outs.append(torch.load(out, weights_only=True))
    assert outs[0]["skipped"] == 1
    for k, v in outs[0]["model"].items():
        assert torch.equal(v, outs[1]["model"][k]), k


def test_train_argument_errors(tmp_path, capsys):
    data = _digits_folder(tmp_path / "data")
    base = ["train", "--model", "svit_digits", "--data", str(data), "--workers", "0"]
    assert main([*base, "--num-classes", "2", "--out", str(tmp_path / "x.pth")]) == 2
    assert main([*base, "--epochs", "0", "--out", str(tmp_path / "x.pth")]) == 2
    assert main([*base, "--img-size", "30", "--out", str(tmp_path / "x.pth")]) == 2
    assert not (tmp_path / "x.pth").exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 3


def test_init_from_imagenet_head_is_reinitialised(tmp_path, capsys):
    data = _digits_folder(tmp_path / "data")
    deit = create_model("vit_digits", num_classes=1000)
    torch.save({"model": deit.state_dict()}, tmp_path / "deit.pth")
    assert main(["train", "--model", "svit_digits", "--init", str(tmp_path / "deit.pth"), "--data", str(data),
                 "--epochs", "1", "--batch-size", "4", "--workers", "0", "--out", str(tmp_path / "o.pth")]) == 0
    assert "head re-initialised" in capsys.readouterr().err
    trained = load_model(tmp_path / "o.pth")  # the file it wrote: the data's classes, the dense weights carried
    assert trained.config.num_classes == len(set(p.parent.name for p in data.rglob("*.png"))) != 1000
    start, now = deit.state_dict(), trained.state_dict()
    assert torch.allclose(now["patch_embed.proj.weight"], start["patch_embed.proj.weight"], atol=1e-3)  # lr 1e-5
    assert not torch.allclose(now["blocks.0.attn.qkv.weight"], create_model("vit_digits").state_dict()[
        "blocks.0.attn.qkv.weight"], atol=1e-2)  # loaded, not a fresh initialisation


@pytest.mark.parametrize("kind", ["file", "parquet", "glob", "list"])
def test_predict_inputs(tmp_path, kind):
    write_image_folder(tmp_path / "imgs", per_class=2)
    if kind == "file":
        source, n = tmp_path / "imgs" / WNIDS[0] / "img0.JPEG", 1
    elif kind == "parquet":
        write_parquet(tmp_path / "pq", n=6, shards=2)
        source, n = next((tmp_path / "pq").glob("*.parquet")), 3
    elif kind == "glob":
        source, n = str(tmp_path / "imgs" / "*" / "*.png"), 3
    else:
        source = tmp_path / "list.txt"
        source.write_text(f"imgs/{WNIDS[1]}/img0.JPEG\n# a comment\nimgs/{WNIDS[2]}/img1.png\n")
        n = 2
    out = tmp_path / "o.jsonl"
    assert main(["predict", *TINY, "--input", str(source), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == n


@pytest.mark.parametrize("args", [["--batch-size", "0"], ["--batch-size", "-4"], ["--topk", "0"], ["--topk", "-1"],
                                  ["--crop-pct", "0"], ["--crop-pct", "-1"], ["--img-size", "100"]])
def test_argument_errors_are_one_line_before_work(tmp_path, capsys, args):
    write_image_folder(tmp_path / "val", per_class=1)
    out = tmp_path / "r.json"
    assert main(["eval", "imagenet", *TINY, "--data", str(tmp_path / "val"), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and not (tmp_path / "r.json.parts").exists()


def test_out_under_a_file_or_read_only(tmp_path, capsys):
    write_image_folder(tmp_path / "val", per_class=1)
    (tmp_path / "afile").write_text("x")
    assert main(["predict", *TINY, "--input", str(tmp_path / "val"), "--out", str(tmp_path / "afile" / "p.csv")]) == 2
    assert "is a file" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        assert main(["predict", *TINY, "--input", str(tmp_path / "val"), "--out", str(ro / "p.csv")]) == 2


def test_empty_batch_gives_empty_outputs():
    model = create_model("svit_tiny").eval()
    feats, usage = model.forward_features(torch.zeros(0, 3, 224, 224), return_usage=True)
    assert feats.shape == (0, 197, 192) and usage.kept.shape == (0, 12)
    assert model.forward_head(feats).shape == (0, 1000)


def test_hidden_folder_keeps_imagenet_labels_and_names(tmp_path, capsys):
    """Items 8 and 9."""
    items = write_image_folder(tmp_path / "val", per_class=2)
    (tmp_path / "val" / ".ipynb_checkpoints").mkdir()
    make_image(np.random.default_rng(0)).save(tmp_path / "val" / ".ipynb_checkpoints" / "x.png")
    ds = open_dataset(tmp_path / "val")
    assert ds.records.label_source == "imagenet_wnid" and sorted(ds.records.labels) == sorted(lab for _, lab in items)
    (tmp_path / "zebras").mkdir()
    make_image(np.random.default_rng(1)).save(tmp_path / "zebras" / "z.png")
    make_image(np.random.default_rng(2)).save(tmp_path / "horses.png")
    out = tmp_path / "p.csv"
    assert main(["predict", *TINY, "--input", str(tmp_path), "--out", str(out)]) == 0
    rows = pd.read_csv(out)
    from nested_svit.data.classes import imagenet_classes

    names = imagenet_classes()[1]
    assert all(names[i] == n for i, n in zip(rows["top1_id"], rows["top1_name"]))  # the model's classes
    assert "WARNING" in capsys.readouterr().err  # folders are not wnids: labels are not ImageNet's
    assert rows.loc[rows["id"] == "horses.png", "label"].item() == -1  # item 12: top-level file has a row


def test_eval_and_predict_output_formats(tmp_path, capsys):
    """Items 10 and 11."""
    write_image_folder(tmp_path / "val", per_class=1)
    common = ["--data", str(tmp_path / "val")]
    assert main(["eval", "imagenet", *TINY, *common, "--out", str(tmp_path / "r.csv")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["mean_keep_ratio"]  # the full result survives
    assert len(pd.read_csv(tmp_path / "r.csv")) == 1
    assert main(["eval", "imagenet", *TINY, *common, "--out", str(tmp_path / "r.parquet")]) == 2
    for name in ("p.JSON", "p.jsonl", "p.CSV", "p.parquet"):
        assert main(["predict", *TINY, *common, "--out", str(tmp_path / name)]) == 0
    assert len(json.loads((tmp_path / "p.JSON").read_text())) == 3
    assert len(pd.read_csv(tmp_path / "p.CSV")) == 3
    assert main(["predict", *TINY, *common, "--out", str(tmp_path / "p.txt")]) == 2
    assert main(["predict", *TINY, *common, "--out", "-"]) == 2


def test_every_file_gets_a_row_or_is_listed(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, fmt in (("a.jfif", "JPEG"), ("b.jpe", "JPEG"), ("noext", "PNG"), ("c.ico", "ICO")):
        (root / name).write_bytes(encode(make_image(rng, size=(32, 32)), fmt))
    (root / "notes.txt").write_text("hello")
    os.symlink(root / "gone.png", root / "dangling.png")
    ds = open_dataset(root)
    assert sorted(ds.records.ids) == ["a.jfif", "b.jpe", "c.ico", "dangling.png", "noext"]
    assert ds.records.ignored == [("notes.txt", "not an image (.txt file)")]
    out = tmp_path / "p.csv"
    assert main(["predict", *TINY, "--input", str(root), "--out", str(out)]) == 0
    rows = pd.read_csv(out).set_index("id")
    assert rows.loc["dangling.png", "status"] == "skipped" and "broken symbolic link" in rows.loc["dangling.png", "error"]
    assert (rows.drop(index="dangling.png")["status"] == "ok").all()


def test_resume_refuses_a_changed_file_list(tmp_path, capsys):
    write_image_folder(tmp_path / "val", per_class=2)
    out = tmp_path / "p.csv"
    parts = tmp_path / "p.csv.parts"
    parts.mkdir()
    args = ["predict", *TINY, "--input", str(tmp_path / "val"), "--out", str(out)]
    from nested_svit.cli import build_parser

    # write the run record of the current file list, as an interrupted run would have
    from nested_svit.cli import options
    from nested_svit.cli.models import model_spec
    from nested_svit.cli.runs import data_options, run_options
    from nested_svit.inference import OutputOptions, classifier_job

    parsed = options.resolve(build_parser().parse_args(args), "classifier", None)
    classifier_job(model_spec(parsed, "classifier"), data_options(parsed, parsed.input, True),
                   run_options(parsed), OutputOptions(str(out)), "predict", topk=parsed.topk).open()
    os.rename(tmp_path / "val" / WNIDS[0] / "img0.JPEG", tmp_path / "val" / WNIDS[0] / "renamed.JPEG")
    assert main(args) == 2
    assert "different run" in capsys.readouterr().err


def test_own_outputs_and_stray_parquet_are_not_input(tmp_path):
    write_image_folder(tmp_path / "d", per_class=1)
    (tmp_path / "d" / WNIDS[0] / "stray.parquet").write_bytes(b"PAR1")
    for _ in range(2):
        assert main(["predict", *TINY, "--input", str(tmp_path / "d"), "--out", str(tmp_path / "d" / "preds.parquet")]) == 0
        assert len(pd.read_parquet(tmp_path / "d" / "preds.parquet")) == 3


def test_large_photos_and_limit(monkeypatch):
    """Pillow's bomb threshold does not apply; our limit does, with the reason."""
    buf = encode(make_image(np.random.default_rng(0), size=(100, 100)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # as if the photo were above Pillow's 89 Mpx
    assert decode_image(buf).size == (100, 100)
    from nested_svit.data.decode import BadImage

    with pytest.raises(BadImage, match="max-image-pixels"):
        decode_image(buf, max_pixels=5000)


def test_float_tiff_and_exif_orientation():
    arr = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    buf = io.BytesIO()
    Image.fromarray(arr, "F").save(buf, "TIFF")
    img = np.asarray(decode_image(buf.getvalue()))
    assert img.max() >= 250 and img.min() <= 5
    photo = make_image(np.random.default_rng(0), size=(80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    buf = io.BytesIO()
    photo.save(buf, "JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (80, 40)
    assert decode_image(buf.getvalue(), exif=True).size == (40, 80)


def test_dense_checkpoint_in_svit_warns(tmp_path, capsys):
    write_image_folder(tmp_path / "val", per_class=1)
    deit = create_model("deit_tiny_patch16_224")
    torch.save({"model": deit.state_dict()}, tmp_path / "deit.pth")
    out = tmp_path / "r.json"
    assert main(["eval", "imagenet", "--model", "svit_tiny", "--checkpoint", str(tmp_path / "deit.pth"), "--img-size",
                 "32", "--workers", "0", "--data", str(tmp_path / "val"), "--out", str(out)]) == 0
    assert "gates of this SViT model are random" in capsys.readouterr().err
    assert any("random" in n for n in json.loads(out.read_text())["checkpoint_notes"])


def test_checkpoint_error_messages(tmp_path):
    model = create_model("svit_tiny")
    cases = {"t.pth": b"101\n", "e.pth": b"", "j.pth": encode(make_image(np.random.default_rng(0)), "JPEG")}
    expected = {"t.pth": "a text file", "e.pth": "an empty file", "j.pth": "a JPEG image"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=expected[name]):
            load_checkpoint(model, tmp_path / name)
    with pytest.raises(CheckpointError, match="folder"):
        load_checkpoint(model, tmp_path)
    bad = create_model("svit_tiny").state_dict()
    bad["pos_embed"] = torch.zeros(1, 199, 192)  # deit3/distilled-like: not a square grid
    with pytest.raises(CheckpointError, match="pos_embed"):
        load_checkpoint(model, bad)


@pytest.mark.parametrize("targets", [[1.2] * 9, [float("nan")] * 9, torch.ones(9), "0.5", [0.5] * 3])
def test_calibrate_keep_rejects_bad_targets(targets):
    model = create_model("svit_tiny", img_size=32).eval()
    with pytest.raises(ValueError):
        model.calibrate_keep(torch.randn(2, 3, 32, 32), targets)


@pytest.mark.slow
def test_keep_budget_knob_and_pictures(tmp_path):
    write_image_folder(tmp_path / "val", per_class=3)
    results = {}
    for scale in ("1.0", "0.5"):
        out = tmp_path / f"r{scale}.json"
        assert main(["eval", "imagenet", *TINY, "--data", str(tmp_path / "val"), "--out", str(out),
                     "--calibrate", "9", "--keep-targets", scale]) == 0
        results[scale] = json.loads(out.read_text())
    assert results["0.5"]["mean_keep_ratio_all_gates"] < results["1.0"]["mean_keep_ratio_all_gates"] - 0.1
    saved = tmp_path / "cal.pth"
    vis = tmp_path / "vis"
    assert main(["predict", *TINY, "--input", str(tmp_path / "val"), "--out", str(tmp_path / "p.csv"),
                 "--calibrate", "9", "--keep-targets", ",".join(["0.5"] * 9), "--save-calibrated", str(saved),
                 "--save-vis", str(vis)]) == 0
    assert len(list(vis.glob("*.png"))) == 9
    rows = pd.read_csv(tmp_path / "p.csv")
    again = tmp_path / "p2.csv"  # the saved calibrated model reproduces the decisions without --calibrate
    assert main(["predict", "--checkpoint", str(saved), "--img-size", "32", "--workers", "0", "--input",
                 str(tmp_path / "val"), "--out", str(again)]) == 0
    pd.testing.assert_series_equal(rows["kept_b11"], pd.read_csv(again)["kept_b11"])
    assert main(["eval", "imagenet", *TINY, "--data", str(tmp_path / "val"), "--out", str(tmp_path / "x.json"),
                 "--keep-targets", "0.5"]) == 2  # needs --calibrate


def test_cli_surface(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "nested-svit" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    help_text = capsys.readouterr().out
    assert "(default: 5)" in help_text and "``" not in help_text
    assert main(["bench", "--models", "foo"]) == 2
    assert "unknown model 'foo'" in capsys.readouterr().err
    assert main(["predict", "--demo", "--model", "svit_small"]) == 2
