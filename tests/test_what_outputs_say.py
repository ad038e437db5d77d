"""What a run says to a new user: each case in one line, on stderr, before or
beside the rows; nothing clipped, resumed or refused silently."""
from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest
import torch

from nested_svit.cli import main

DIGITS = Path(str(resources.files("nested_svit.assets") / "digits_samples"))
DIGITS_PTH = str(resources.files("nested_svit.assets") / "svit_digits.pth")
RUN = ["--workers", "0", "--threads", "1"]


def test_topk_above_the_class_count_is_said_not_clipped_silently(tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["predict", "--demo", "--topk", "20", "--out", str(out), *RUN]) == 0
    assert "--topk 20 is more than the 10 classes the model has: rows hold the top 10" in capsys.readouterr().err
    assert [c for c in pd.read_csv(out).columns if c.startswith("top") and c.endswith("_id")][-1] == "top10_id"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
@pytest.mark.parametrize("device, says", [("cuda", "torch sees no CUDA device here"), ("gpu0", "not a device name")])
def test_a_device_torch_does_not_have_is_one_line(tmp_path, capsys, device, says):
    assert main(["predict", "--demo", "--device", device, "--out", str(tmp_path / "p.csv"), *RUN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "nvidia.com" not in err[0]


def test_a_valid_labels_file_with_a_class_twice_is_refused(tmp_path, capsys):
    listed = tmp_path / "valid.txt"
    listed.write_text("1\n3\n# comment\n3\n")
    assert main(["predict", "--demo", "--valid-labels", str(listed), "--out", str(tmp_path / "p.csv"), *RUN]) == 2
    assert "index 3 is on lines 2 and 4" in capsys.readouterr().err


def test_a_resumed_run_says_so_and_ends_with_the_rows_of_an_uninterrupted_one(tmp_path, capsys, monkeypatch):
    from nested_svit.inference.parts import PartStore

    data = tmp_path / "val"
    for d in ("2", "6", "8"):  # 10 images, 5 batches of 2
        shutil.copytree(DIGITS / d, data / d)
    full, resumed = tmp_path / "full.csv", tmp_path / "resumed.csv"
    args = ["predict", "--checkpoint", DIGITS_PTH, "--input", str(data), "--batch-size", "2", *RUN]
    assert main([*args, "--out", str(full)]) == 0
    assert "resuming" not in capsys.readouterr().err  # a fresh run does not say it resumed
    commit = PartStore.commit

    def interrupted_after_two(self, batch, rows):
        if len(list(Path(self.parts_dir).glob("batch-*"))) == 2:
            raise KeyboardInterrupt  # as Ctrl-C between two batches
        commit(self, batch, rows)

    monkeypatch.setattr(PartStore, "commit", interrupted_after_two)
    assert main([*args, "--out", str(resumed)]) != 0
    monkeypatch.setattr(PartStore, "commit", commit)
    capsys.readouterr()
    assert main([*args, "--out", str(resumed)]) == 0
    assert "resuming " + str(tmp_path / "resumed.csv.parts") + ": 4 of 10 images already done, 6 to go" in \
        capsys.readouterr().err
    keep = [c for c in pd.read_csv(full).columns if c != "seconds"]
    assert pd.read_csv(resumed)[keep].equals(pd.read_csv(full)[keep])


def test_a_set_without_labelled_images_says_so_instead_of_nan(tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted((DIGITS / "2").iterdir()):
        shutil.copy(f, flat / f.name)
    assert main(["eval", "imagenet", "--checkpoint", DIGITS_PTH, "--data", str(flat), "--out", str(tmp_path / "r.json"),
                 *RUN]) == 0
    out = capsys.readouterr().out
    assert "ece n/a (no labelled images)" in out and "nan%" not in out


def test_the_reliability_diagram_never_draws_over_an_accuracy_bar():
    """An underconfident bin (accuracy 1.0, mean top-1 probability 0.54) reads 1.0: nothing filled lies on
    its bar, and the probability is a mark at 0.54."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nested_svit.viz import reliability_axes

    bins = pd.DataFrame({"lower": [0.5, 0.9], "upper": [0.6, 1.0], "images": [4, 6], "accuracy": [1.0, 0.5],
                         "confidence": [0.54, 0.95]})
    fig, ax = plt.subplots()
    reliability_axes(ax, bins, (bins["upper"] - bins["lower"]).to_numpy())
    filled = [p for p in ax.patches if p.get_fill() and p.get_facecolor()[3] > 0]
    assert sorted(round(p.get_height(), 6) for p in filled) == [0.5, 1.0]  # the bars, and only they
    marks = [c for c in ax.collections if c.get_label() == "its mean top-1 probability"][0]
    assert sorted(round(float(seg[0][1]), 6) for seg in marks.get_segments()) == [0.54, 0.95]
    plt.close(fig)


def test_bench_into_a_log_writes_its_bar_once_and_counts_parameters_in_millions(tmp_path, capsys):
    from nested_svit import create_model

    out = tmp_path / "b.csv"
    assert main(["bench", "--models", "vit_digits", "--batch-sizes", "1,2", "--rounds", "5", "--min-time", "0",
                 "--out", str(out), "--plot", str(tmp_path / "b.png")]) == 0
    drawn = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.startswith("bench:")]
    assert len(drawn) <= 3 and drawn[-1].startswith("bench: 100%")  # 10 rounds, drawn at the start and the end
    # param_count in millions, as timm's benchmark and results files and our eval (it was a raw count)
    expected = round(sum(p.numel() for p in create_model("vit_digits").parameters()) / 1e6, 2)
    assert pd.read_csv(out)["param_count"].tolist() == [expected] * 2 and 0 < expected < 1


@pytest.mark.slow  # a cold inductor compile, ~12 s
def test_compile_on_a_cpu_prints_no_cuda_home_warning(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # cold: the warning came then
    out = subprocess.run([sys.executable, "-m", "nested_svit.cli", "predict", "--demo", "--compile", "--device", "cpu",
                          "--out", str(tmp_path / "p.csv"), *RUN], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CUDA_HOME" not in out.stderr and "--compile: the blocks' regions compiled" in out.stderr
