"""What a classifier's rows are labelled with: class folders by the model's own class names, folders
named by class index, sorted-folder labels warned, images outside the class folders counted, each
against an independent reference (the model run directly on each image, the folder names)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from datasets_fixtures import make_image
from digits_fixtures import DIGITS, DIGITS_PTH, RUN, TINY, digit_folders, direct_top1
from nested_svit.cli import main


def test_folders_are_labelled_by_the_model_class_names(tmp_path, named_digits, capsys):
    data = digit_folders(tmp_path / "val", ["3", "7"])
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
    assert result["top1"] == pytest.approx(direct_top1(rows, [str(i) for i in range(10)]))
    assert result["top1"] > 0  # was 0.00: folders 3 and 7 had become labels 0 and 1


def test_a_folder_that_is_not_a_class_is_an_error_or_unlabelled(tmp_path, named_digits, capsys):
    data = digit_folders(tmp_path / "val", ["3"])
    shutil.copytree(DIGITS / "7", data / "seven")
    args = ["eval", "imagenet", "--checkpoint", str(named_digits), "--data", str(data), *RUN]
    assert main([*args, "--out", str(tmp_path / "a.json")]) == 2
    assert "seven" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b.json"), "--ignore-unknown-classes"]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    sevens = len(list((DIGITS / "7").iterdir()))
    assert result["num_images"] == 2 and result["num_predicted"] == 2 + sevens  # those in seven/ are not scored
    assert "seven" in capsys.readouterr().err


def test_sorted_folder_labels_are_warned_for_every_class_count(tmp_path, capsys):
    data = tmp_path / "val"
    shutil.copytree(DIGITS / "3", data / "three")
    shutil.copytree(DIGITS / "7", data / "seven")
    assert main(["eval", "imagenet", "--model", "svit_digits", "--checkpoint", DIGITS_PTH, "--data", str(data),
                 "--out", str(tmp_path / "r.json"), *RUN]) == 0
    err = capsys.readouterr().err
    assert "sorted folder order" in err and "0: seven" in err and "--class-names" in err


def test_folders_named_by_class_index_are_those_classes(tmp_path, capsys):
    """Folders that are all class numbers below the class count (ImageNet-V2's 0..999) are those classes
    (issue 23): 3/ and 7/ of the digits model are classes 3 and 7, not the sorted 0 and 1, and no warning."""
    data = digit_folders(tmp_path / "val", ["3", "7"])
    assert main(["eval", "imagenet", "--model", "svit_digits", "--checkpoint", DIGITS_PTH, "--data", str(data),
                 "--out", str(tmp_path / "r.json"), *RUN]) == 0
    assert "WARNING" not in capsys.readouterr().err
    result = json.loads((tmp_path / "r.json").read_text())
    rows = pd.read_csv(result["per_class_csv"])
    assert result["label_source"] == "folder_index" and rows["class_index"].tolist() == [3, 7]
    predicted = tmp_path / "p.csv"
    assert main(["predict", "--model", "svit_digits", "--checkpoint", DIGITS_PTH, "--input", str(data),
                 "--out", str(predicted), *RUN]) == 0
    assert result["top1"] == pytest.approx(direct_top1(pd.read_csv(predicted), [str(i) for i in range(10)]))
    assert result["top1"] > 0


def test_the_summary_says_how_many_images_are_labelled(tmp_path, capsys):
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
