"""The command line's surface: bench's FLOP convention and a trained file measured with its own gates,
train files and messages, Ray's threads and its stderr noise, the library's loaders, --help."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from digits_fixtures import DIGITS, DIGITS_PTH, RUN, digit_folders
from nested_svit import create_model, load_checkpoint
from nested_svit.cli import main


def test_bench_reports_multiply_adds_as_the_paper(tmp_path):
    from nested_svit.benchmark import BenchConfig, run_benchmark

    df = run_benchmark(BenchConfig(models=["deit_small_patch16_224"], batch_sizes=[1], rounds=1, min_time=0,
                                   warmup=0))
    assert "gflops_per_image" not in df.columns
    assert df["gmacs_per_image"].iloc[0] == pytest.approx(4.6, abs=0.05)  # DeiT-S: 4.6 GMACs (the paper's)


def test_train_files_report_their_own_format(tmp_path, named_digits):
    model = create_model("svit_digits")
    assert load_checkpoint(model, named_digits).format == "nested_svit"
    assert load_checkpoint(model, DIGITS_PTH).format == "timm"  # a plain state dict stays timm's


@pytest.mark.slow
def test_ray_actor_argument_noise_is_filtered_and_nothing_else(tmp_path):
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


def test_ray_actors_default_to_the_local_threads_or_say_why_not():
    from nested_svit.cli import build_parser, options
    from nested_svit.cli.engine import ray_threads, threads_note

    def parsed(*extra):
        return options.resolve(build_parser().parse_args(["predict", "--input", ".", "--engine", "ray", *extra]),
                               "classifier", None)

    local = torch.get_num_threads()
    threads, note = ray_threads(parsed()), threads_note(parsed())
    # the local run's threads, or a line that says the actors run others and how to get the local floats
    assert (threads == local and note == []) or (
        threads != local and len(note) == 1 and f"runs {threads} torch thread(s), a local run {local}" in note[0])
    assert ray_threads(parsed("--cpus-per-actor", str(local + 1))) == local + 1  # what the user asks for
    note = threads_note(parsed("--cpus-per-actor", str(local + 1)))
    assert note and "last bits" in note[0] and f"--cpus-per-actor {local}" in note[0]


def test_load_model_and_load_detector_build_what_the_file_describes(tmp_path, named_digits, tiny_detector_file):
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


def test_bench_checkpoint_measures_the_model_with_its_own_gates(tmp_path, named_digits):
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


def test_train_without_init_says_it_starts_from_random_weights(tmp_path, capsys):
    data = digit_folders(tmp_path / "a", ["0", "1"])
    assert main(["train", "--model", "svit_tiny", "--img-size", "32", "--batch-size", "2", "--epochs", "1", *RUN,
                 "--data", str(data), "--out", str(tmp_path / "t.pth")]) == 0
    err = capsys.readouterr().err
    assert "no --init" in err and "random weights" in err and "lr 1e-05" in err


@pytest.mark.parametrize("command", [["predict"], ["eval", "imagenet"], ["eval", "coco"], ["train"], ["bench"]])
def test_help_shows_each_default_once_and_no_bare_none(command, capsys):
    import re

    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = capsys.readouterr().out
    blocks = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    assert not [b for b in blocks if "(default: None)" in b or "None:" in b or b.count("default") > 1]


@pytest.mark.slow
def test_the_baselines_table_help_explains_every_option():
    script = Path(__file__).resolve().parents[1] / "eval" / "baselines_table.py"
    text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True).stdout
    options = text.split("options:", 1)[1]
    for flag in ("--out", "--batch-sizes", "--rounds", "--min-time", "--threads"):
        entry = options.split(f"\n  {flag}", 1)[1].split("\n  -", 1)[0]
        assert len(entry.split()) > 4, flag  # a sentence after the metavar, not the metavar alone
