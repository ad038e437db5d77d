"""eval / predict through the CLI, checked against an independent transform + per-image forward."""
from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from classify_reference import MODEL_ARGS, reference_logits, write_checkpoint
from datasets_fixtures import make_image, write_arrow, write_image_folder, write_parquet
from procs import cli_command
from PIL import Image
from torchvision import transforms as T

from nested_svit import create_model, load_checkpoint
from nested_svit.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "svit_tiny.pth")


def topk_accuracy(logits: torch.Tensor, labels: list[int]) -> tuple[float, float]:
    labels_t = torch.tensor(labels)
    top5 = logits.topk(5, -1).indices
    return (float((top5[:, 0] == labels_t).float().mean() * 100),
            float((top5 == labels_t[:, None]).any(1).float().mean() * 100))


def test_eval_imagefolder_matches_independent_topk(tmp_path, checkpoint):
    items = write_image_folder(tmp_path / "val")
    out = tmp_path / "res.json"
    assert main(["eval", "imagenet", *MODEL_ARGS, "--checkpoint", str(checkpoint), "--data", str(tmp_path / "val"),
                 "--batch-size", "5", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    logits = reference_logits(checkpoint, [Image.open(tmp_path / "val" / rel) for rel, _ in items])
    top1, top5 = topk_accuracy(logits, [lab for _, lab in items])
    assert res["num_images"] == len(items) == 12 and res["num_skipped"] == 0
    assert res["top1"] == pytest.approx(top1) and res["top5"] == pytest.approx(top5)
    assert res["checkpoint_sha256"] and res["transform"]["resize_to"] == 73
    assert res["label_source"] == "imagenet_wnid"
    assert set(res["mean_keep_ratio"]) == {f"block{b}" for b in range(3, 12)}
    assert all(sum(c) == 12 for c in res["token_usage_histogram"]["counts"].values())
    assert res["images_per_sec"] > 0
    row = pd.read_csv(out.with_suffix(".csv"))
    assert len(row) == 1 and row["top1"][0] == pytest.approx(top1)
    assert not (tmp_path / "res.json.parts").exists()


@pytest.mark.parametrize("layout", ["parquet", "arrow"])
def test_eval_hf_layouts(tmp_path, checkpoint, layout):
    records = write_parquet(tmp_path / "hf") if layout == "parquet" else write_arrow(tmp_path / "hf")
    out = tmp_path / "res.json"
    assert main(["eval", "imagenet", *MODEL_ARGS, "--checkpoint", str(checkpoint), "--data", str(tmp_path / "hf"),
                 "--batch-size", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    logits = reference_logits(checkpoint, [Image.open(io.BytesIO(b)) for b, _ in records])
    top1, top5 = topk_accuracy(logits, [lab for _, lab in records])
    assert res["num_images"] == len(records)
    assert res["top1"] == pytest.approx(top1) and res["top5"] == pytest.approx(top5)
    assert res["data_kind"] == layout


def test_predict_names_and_csv(tmp_path, checkpoint):
    records = write_arrow(tmp_path / "hf")
    out = tmp_path / "preds.csv"
    assert main(["predict", *MODEL_ARGS, "--checkpoint", str(checkpoint), "--input", str(tmp_path / "hf"),
                 "--batch-size", "4", "--topk", "3", "--out", str(out)]) == 0
    rows = pd.read_csv(out)
    logits = reference_logits(checkpoint, [Image.open(io.BytesIO(b)) for b, _ in records])
    probs = logits.softmax(-1)
    assert rows["index"].tolist() == list(range(len(records)))
    assert rows["top1_id"].tolist() == logits.argmax(-1).tolist()
    np.testing.assert_allclose(rows["top1_prob"], probs.max(-1).values.numpy(), rtol=1e-4)
    from nested_svit.data.classes import imagenet_classes

    names = imagenet_classes()[1]  # a 1000-class model's outputs are ImageNet classes, whatever the data's names
    assert all(n == names[i] for n, i in zip(rows["top1_name"], rows["top1_id"]))
    truth = ["cat", "dog", "fox"]  # the data set's ClassLabel names describe its labels, in their own column
    assert all(n == truth[lab] for n, lab in zip(rows["label_name"], rows["label"]))
    kept = rows[[f"kept_b{b}" for b in range(12)]].to_numpy()
    assert (kept[:, :3] == 17).all() and (kept[:, 3:] <= 17).all()


def test_bad_images_skipped_and_counted(tmp_path, checkpoint):
    items = write_image_folder(tmp_path / "val", per_class=2)
    rng = np.random.default_rng(5)
    cls = tmp_path / "val" / "n01440764"
    (cls / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    make_image(rng, "L").save(cls / "gray.png")
    make_image(rng, "CMYK").save(cls / "cmyk.JPEG", format="JPEG")
    make_image(rng, "RGBA").save(cls / "alpha.png")
    make_image(rng, "RGB", size=(3, 2)).save(cls / "tiny.png")
    out = tmp_path / "res.json"
    assert Image.open(cls / "cmyk.JPEG").mode == "CMYK"
    assert main(["eval", "imagenet", *MODEL_ARGS, "--checkpoint", str(checkpoint), "--data", str(tmp_path / "val"),
                 "--batch-size", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["num_images"] == len(items) + 4
    assert res["num_skipped"] == 1
    assert res["skipped"][0]["id"] == "n01440764/corrupt.JPEG"
    assert "corrupt" in res["skipped"][0]["reason"] or "not a recognised" in res["skipped"][0]["reason"]


def test_wrong_checkpoint_fails_before_reading_images(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}}, bad)
    missing_data = tmp_path / "does-not-exist"
    assert main(["eval", "imagenet", *MODEL_ARGS, "--checkpoint", str(bad), "--data", str(missing_data)]) == 2
    err = capsys.readouterr().err
    assert "does not fit model" in err and "missing" in err  # the checkpoint error, not the data error


_cli = cli_command


@pytest.mark.slow
def test_killed_predict_resumes_exactly_once(tmp_path, checkpoint, kill_midway):
    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(3)
    for i in range(24):
        make_image(rng, size=(256, 256)).save(data / f"{i:03d}.png")
    args = ["predict", "--model", "svit_small", "--random-weights", "--input", str(data), "--batch-size", "2",
            "--workers", "0", "--threads", "1"]
    interrupted = tmp_path / "interrupted.parquet"
    parts = tmp_path / "interrupted.parquet.parts"
    done_before = len(kill_midway(_cli(*args, "--out", str(interrupted)), parts, 3, timeout=120))
    assert 3 <= done_before < 12 and not interrupted.exists(), "the run should have been killed midway"
    assert subprocess.run(_cli(*args, "--out", str(interrupted)), capture_output=True).returncode == 0
    clean = tmp_path / "clean.parquet"
    assert subprocess.run(_cli(*args, "--out", str(clean)), capture_output=True).returncode == 0
    a, b = pd.read_parquet(interrupted), pd.read_parquet(clean)
    assert len(a) == 24 and a["index"].is_unique and a["id"].tolist() == sorted(a["id"])
    pd.testing.assert_frame_equal(a, b)
    assert not parts.exists()


def test_resume_refuses_parts_of_another_run(tmp_path, checkpoint, capsys):
    write_image_folder(tmp_path / "val", per_class=1)
    out = tmp_path / "p.parquet"
    parts = tmp_path / "p.parquet.parts"
    parts.mkdir()
    record = json.dumps({"kind": "predict", "model": "other"})
    (parts / "manifest.json").write_text(record)
    (parts / "batch-0000000.parquet").write_bytes(b"another run's rows")
    assert main(["predict", *MODEL_ARGS, "--checkpoint", str(checkpoint), "--input", str(tmp_path / "val"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{parts} holds partial results of a different run" in err and "'model'" in err  # names what differs
    assert (parts / "manifest.json").read_text() == record and not out.exists()  # nothing of it touched or mixed in
    assert (parts / "batch-0000000.parquet").read_bytes() == b"another run's rows"


@pytest.mark.slow
def test_torchrun_two_processes_equal_single(tmp_path, checkpoint, torchrun):
    write_image_folder(tmp_path / "val", per_class=5)
    common = [*MODEL_ARGS[:-2], "--threads", "1", "--checkpoint", str(checkpoint), "--batch-size", "3"]
    single_json, dist_json = tmp_path / "single.json", tmp_path / "dist.json"
    assert main(["eval", "imagenet", *common, "--data", str(tmp_path / "val"), "--out", str(single_json)]) == 0
    assert main(["predict", *common, "--input", str(tmp_path / "val"), "--out", str(tmp_path / "single.parquet")]) == 0
    for cmd in (["eval", "imagenet", *common, "--data", str(tmp_path / "val"), "--out", str(dist_json)],
                ["predict", *common, "--input", str(tmp_path / "val"), "--out", str(tmp_path / "dist.parquet")]):
        run = torchrun("-m", "nested_svit.cli", *cmd, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    single, dist = json.loads(single_json.read_text()), json.loads(dist_json.read_text())
    assert dist["world_size"] == 2 and single["world_size"] == 1
    for key in ("top1", "top5", "num_images", "num_skipped", "mean_keep_ratio", "token_usage_histogram"):
        assert dist[key] == single[key], key
    a, b = pd.read_parquet(tmp_path / "single.parquet"), pd.read_parquet(tmp_path / "dist.parquet")
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5)


def test_predict_demo_uses_bundled_model_and_images(tmp_path):
    """The README's main job: bundled SViT (trained on digits) on bundled PNGs, checked against an
    independent pipeline (torchvision transform, reference execution)."""
    from importlib import resources

    out = tmp_path / "demo.csv"
    assert main(["predict", "--demo", "--workers", "0", "--out", str(out)]) == 0
    rows = pd.read_csv(out)
    assets = resources.files("nested_svit.assets")
    model = create_model("svit_digits")
    load_checkpoint(model, str(assets / "svit_digits.pth"))
    model.eval().set_execution("reference")
    tf = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])  # 32 px, crop 1.0
    samples = Path(str(assets / "digits_samples"))
    with torch.no_grad():
        expected = [int(model(tf(Image.open(samples / rid).convert("RGB")).unsqueeze(0)).argmax())
                    for rid in rows["id"]]
    assert len(rows) == 20 and rows["top1_id"].tolist() == expected
    assert (rows["top1_id"] == rows["label"]).mean() >= 0.9  # a trained model, not random weights
    assert (rows["kept_b11"] < 65).all()
