"""What is read as input and how: our own earlier outputs never, a stray parquet beside images not, the
pixel limit said, EXIF orientation recorded as found, a plain state dict run as the model of its shape,
parquet rows named by their path or their shard and row."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
from PIL import Image

from datasets_fixtures import make_image
from digits_fixtures import DIGITS, DIGITS_PTH, TINY, digit_folders
from nested_svit.cli import main


def test_earlier_pictures_predictions_and_parts_are_not_read_back(tmp_path, capsys):
    data = digit_folders(tmp_path / "photos", ["4"])
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


def test_a_stray_parquet_in_a_folder_of_images_keeps_it_a_folder_of_images(tmp_path):
    data = digit_folders(tmp_path / "photos", ["4"])
    pd.DataFrame({"x": [1, 2]}).to_parquet(data / "stray.parquet")
    assert main(["predict", *TINY, "--input", str(data), "--out", str(tmp_path / "p.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "p.csv")) == len(list((DIGITS / "4").iterdir()))


def test_a_size_limit_says_so_and_zero_limits_are_argument_errors(tmp_path, capsys):
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


def test_orientation_records_the_exif_tag_found(tmp_path):
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


def test_a_plain_state_dict_without_model_runs_the_model_of_its_shape_and_says_so(tmp_path, capsys):
    data = digit_folders(tmp_path / "val", ["1"])
    assert main(["predict", "--checkpoint", DIGITS_PTH, "--input", str(data), "--out", str(tmp_path / "p.csv")]) == 0
    err = capsys.readouterr().err
    assert "state dict of svit_digits's shape: running svit_digits at 32 px, 10 classes" in err
    assert main(["predict", "--checkpoint", DIGITS_PTH, "--model", "svit_digits", "--input", str(data),
                 "--out", str(tmp_path / "q.csv")]) == 0
    found, named = pd.read_csv(tmp_path / "p.csv"), pd.read_csv(tmp_path / "q.csv")
    assert len(found) == 1 and found.drop(columns=["seconds"], errors="ignore").equals(
        named.drop(columns=["seconds"], errors="ignore"))


def test_parquet_inputs_use_the_image_path_or_its_shard_and_row_as_the_id(tmp_path):
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
