"""``predict --out DIR/``: the rows as a partitioned Parquet data set, one part per global batch, read as one
table by pandas and pyarrow (and Ray Data, slow tier) with exactly the rows of a file output; parts of
skipped-only batches unified with the rest; a killed run resumes; a finished one is recomputed; the folder
is never read back as input."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from datasets_fixtures import write_awkward_folder, write_image_folder
from procs import cli_command
from nested_svit.cli.main import main

TINY = ["--model", "svit_tiny", "--random-weights", "--img-size", "64", "--workers", "0", "--threads", "2"]


def _table(folder) -> pd.DataFrame:
    return pd.read_parquet(folder).sort_values("index").reset_index(drop=True)


def _equal_rows(want: pd.DataFrame, got: pd.DataFrame) -> None:
    assert list(want.columns) == list(got.columns)
    exact = [c for c in want.columns if not c.endswith("_prob")]
    pd.testing.assert_frame_equal(want[exact], got[exact], check_dtype=False)
    probs = [c for c in want.columns if c.endswith("_prob")]
    np.testing.assert_allclose(want[probs].to_numpy(float), got[probs].to_numpy(float), atol=1e-6, rtol=0)


def test_a_data_set_folder_reads_as_the_file_rows(tmp_path):
    import pyarrow.dataset as pds

    write_awkward_folder(tmp_path / "in")
    # the first part holds only a skipped image (5 columns): a reader that took its schema would drop the rest
    (tmp_path / "in" / "000 broken.jpg").write_bytes(b"\xff\xd8 broken")
    args = ["predict", *TINY, "--batch-size", "1", "--input", str(tmp_path / "in")]  # skipped images: parts of nulls
    assert main([*args, "--out", str(tmp_path / "rows.parquet")]) == 0
    assert main([*args, "--out", f"{tmp_path / 'ds'}/"]) == 0
    want = pd.read_parquet(tmp_path / "rows.parquet")
    parts = sorted((tmp_path / "ds").glob("part-*.parquet"))
    assert len(parts) == len(want) == 14 and (tmp_path / "ds" / "_SUCCESS").exists()
    _equal_rows(want, _table(tmp_path / "ds"))
    assert pds.dataset(str(tmp_path / "ds"), format="parquet").to_table().num_rows == 14
    manifest = json.loads((tmp_path / "ds" / "_manifest.json").read_text())
    assert manifest["rows"] == 14 and manifest["parts"] == [p.name for p in parts] and "checkpoint_sha256" in manifest
    assert not (tmp_path / "ds" / "_nested_svit_run.json").exists()
    # never read back as input: a later run over the parent folder lists it as ignored
    images = ["--input", str(tmp_path), "--out", str(tmp_path / "again.csv")]
    assert main(["predict", *TINY, *images]) == 0
    again = pd.read_csv(tmp_path / "again.csv")
    assert not again["id"].str.contains("part-").any()


@pytest.mark.slow  # a kill-and-resume variant (~11 s); the fast tier resumes in-process below
def test_a_killed_data_set_run_resumes_and_a_finished_one_is_recomputed(tmp_path, capsys, kill_midway):
    write_image_folder(tmp_path / "in", per_class=12)  # 36 images, 9 batches of 4
    args = ["predict", *TINY, "--batch-size", "4", "--input", str(tmp_path / "in")]
    assert main([*args, "--out", str(tmp_path / "rows.parquet")]) == 0
    ds = tmp_path / "ds"
    committed = kill_midway(cli_command(*args, "--out", f"{ds}/"), ds, at_least=2, pattern="part-*.parquet")
    assert 2 <= len(committed) < 9 and not (ds / "_SUCCESS").exists() and (ds / "_nested_svit_run.json").exists()
    assert main([*args, "--out", f"{ds}/"]) == 0
    want = pd.read_parquet(tmp_path / "rows.parquet")
    _equal_rows(want, _table(ds))
    capsys.readouterr()
    assert main([*args, "--topk", "3", "--out", f"{ds}/"]) == 0  # a finished data set: computed again
    said = capsys.readouterr()
    assert "holds a finished run's data set: it is computed again" in said.out + said.err
    assert "top4_id" not in _table(ds).columns and len(_table(ds)) == 36


def test_data_set_outputs_refuse_what_they_cannot_do(tmp_path, capsys, tiny_detector_file, monkeypatch):
    write_image_folder(tmp_path / "in", per_class=1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("a user's file")
    base = ["predict", *TINY, "--input", str(tmp_path / "in")]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert main([*base, "--out", "s3://bucket/preds/"]) == 2
    assert main([*base, "--out", f"{tmp_path / 'full'}/"]) == 2
    assert main([*base, "--out", f"{tmp_path / 'v'}/", "--save-vis", str(tmp_path / "pics")]) == 2
    assert main(["predict", "--checkpoint", str(tiny_detector_file), "--input", str(tmp_path / "in"),
                 "--out", f"{tmp_path / 'det'}/", "--save-vis", str(tmp_path / "pics")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 4, err
    assert "s3://bucket/preds/: no credentials found" in err[0] and "holds other files" in err[1]
    assert "--save-vis needs a file --out" in err[2] and "--save-vis needs a file --out" in err[3]
    assert (tmp_path / "full" / "mine.txt").exists() and not (tmp_path / "full" / ".nested-svit-dataset").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_ray_writes_the_same_data_set(tmp_path):
    ray = pytest.importorskip("ray")
    write_image_folder(tmp_path / "in", per_class=3)
    model = ["predict", "--model", "svit_tiny", "--random-weights", "--img-size", "64", "--batch-size", "4",
             "--input", str(tmp_path / "in")]
    assert main([*model, "--workers", "0", "--threads", "2", "--out", f"{tmp_path / 'local'}/"]) == 0
    assert main([*model, "--engine", "ray", "--actors", "2", "--out", f"{tmp_path / 'ray'}/"]) == 0
    _equal_rows(_table(tmp_path / "local"), _table(tmp_path / "ray"))
    assert not list((tmp_path / "ray").glob("*ray-images*"))  # Ray's table of the run's images is a side file
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert ray.data.read_parquet(str(tmp_path / "ray")).count() == 9
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_torchrun_writes_the_one_process_data_set_and_recomputes_a_finished_one(tmp_path, torchrun):
    """Two processes commit their own batches into one folder: the table of one process's run. Run again
    over the finished folder, every rank must see it cleared before it lists what is pending: a rank that
    listed first would take the old parts as done, and the clearing rank would then delete them."""
    write_image_folder(tmp_path / "in", per_class=5)  # 15 images, 8 batches of 2
    args = ["predict", *TINY[:-2], "--threads", "1", "--batch-size", "2", "--input", str(tmp_path / "in")]
    assert main([*args, "--out", f"{tmp_path / 'one'}/"]) == 0
    want = _table(tmp_path / "one")
    for attempt in ("fresh", "over the finished one"):
        run = torchrun("-m", "nested_svit.cli", *args, "--out", f"{tmp_path / 'two'}/", timeout=300)
        assert run.returncode == 0, (attempt, run.stderr[-3000:])
        _equal_rows(want, _table(tmp_path / "two"))
        assert len(list((tmp_path / "two").glob("part-*.parquet"))) == 8 and (tmp_path / "two" / "_SUCCESS").exists()


def test_a_run_checks_its_record_and_lists_its_output_once(tmp_path, monkeypatch):
    """The run record is checked, and a data set's folder or prefix listed, once per run: a fresh run, a
    resumed one, a finished one computed again, and a file output's parts."""
    from nested_svit.inference import dataset_out, parts

    calls = {"listings": 0, "records": 0}
    listing, record = dataset_out.Location.names, parts.check_run_record

    def counted_listing(self):
        calls["listings"] += 1
        return listing(self)

    def counted_record(*a, **k):
        calls["records"] += 1
        return record(*a, **k)

    monkeypatch.setattr(dataset_out.Location, "names", counted_listing)
    monkeypatch.setattr(parts, "check_run_record", counted_record)
    real_refuse = dataset_out.refuse_other_run
    monkeypatch.setattr(dataset_out, "refuse_other_run",
                        lambda *a: (calls.__setitem__("records", calls["records"] + 1), real_refuse(*a)))
    write_image_folder(tmp_path / "in", per_class=2)  # 6 images, 3 batches of 2
    args = ["predict", *TINY, "--batch-size", "2", "--input", str(tmp_path / "in")]
    ds = tmp_path / "ds"
    assert main([*args, "--out", f"{ds}/"]) == 0
    assert calls == {"listings": 1, "records": 0}  # a new run: nothing to check, its record written
    calls.update(listings=0, records=0)
    assert main([*args, "--out", f"{ds}/"]) == 0  # a finished data set, computed again
    assert calls == {"listings": 1, "records": 0} and len(list(ds.glob("part-*.parquet"))) == 3
    (ds / "_SUCCESS").unlink()  # the parts of an unfinished run of other flags
    (ds / "_nested_svit_run.json").write_text(json.dumps({"kind": "predict", "model": "another"}))
    calls.update(listings=0, records=0)
    assert main([*args, "--out", f"{ds}/"]) == 2  # refused
    assert calls == {"listings": 1, "records": 1}
    calls.update(listings=0, records=0)
    assert main([*args, "--out", str(tmp_path / "rows.csv")]) == 0
    assert calls == {"listings": 0, "records": 1}


def test_a_detector_writes_a_data_set_with_the_file_rows(tmp_path):
    """Detectors' rows (list columns: boxes, scores, labels, names, masks) as a data set read back as the
    file output's rows, a skipped image among them."""
    import torch
    from coco_fixtures import make_coco
    from nested_svit.inference.writers import plain_records
    from nested_svit.detection import create_detector
    from nested_svit.detection.adapter import AdapterConfig
    from nested_svit.detection.checkpoint import save_detector_checkpoint

    torch.manual_seed(0)
    det = create_detector("svit_adapter_tiny_maskrcnn", embed_dim=48, num_heads=2, num_classes=2,
                          adapter=AdapterConfig(conv_inplane=8, deform_heads=2), fpn_channels=16, img_scale=(96, 64),
                          class_names=("square", "bar"))
    save_detector_checkpoint(det, tmp_path / "det.pth")
    _, images = make_coco(tmp_path / "coco", sizes=[(40, 56), (48, 40), (40, 40)], corrupt=1)
    args = ["predict", "--checkpoint", str(tmp_path / "det.pth"), "--input", str(images), "--batch-size", "1",
            "--workers", "0", "--threads", "1"]
    assert main([*args, "--out", str(tmp_path / "rows.parquet")]) == 0
    assert main([*args, "--out", f"{tmp_path / 'ds'}/"]) == 0
    want, got = pd.read_parquet(tmp_path / "rows.parquet"), _table(tmp_path / "ds")
    assert list(want.columns) == list(got.columns) and want["status"].tolist() == ["ok", "skipped", "ok"]
    assert plain_records(want) == plain_records(got)
    assert want["num_detections"].tolist()[0] == len(want["boxes"][0]) > 0 and len(want["boxes"][1]) == 0
