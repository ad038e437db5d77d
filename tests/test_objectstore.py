"""Inputs in object storage, against a real S3 server on loopback (``s3_fixtures``: moto's server mode):
the rows of an uploaded folder are the local rows (ids: the URIs), labels come from the keys' class
folders, listing reads no image, a vanished object is a skipped row, a missing bucket, absent or bad
credentials are one line each; a data set output in the bucket is the local table, and resumes."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from datasets_fixtures import write_awkward_folder, write_image_folder
from s3_fixtures import s3_client, upload_tree
from nested_svit.cli.main import main

TINY = ["--model", "svit_tiny", "--random-weights", "--img-size", "64", "--batch-size", "4", "--workers", "2",
        "--threads", "2"]


def _same_rows(local: pd.DataFrame, remote: pd.DataFrame, prefix: str) -> None:
    """Row for row the local run's, the id being the object's URI."""
    assert remote["id"].tolist() == [prefix + i for i in local["id"]]
    rest = [c for c in local.columns if c != "id" and not c.endswith("_prob")]
    pd.testing.assert_frame_equal(local[rest], remote[rest])
    probs = [c for c in local.columns if c.endswith("_prob")]
    np.testing.assert_allclose(local[probs].to_numpy(float), remote[probs].to_numpy(float), atol=1e-6, rtol=0)


@pytest.mark.slow  # ~4 s; test_s3_in_s3_out_is_the_local_table reads the same folder from the bucket fast
def test_awkward_folder_on_s3_gives_the_local_rows(tmp_path, s3):
    kinds = write_awkward_folder(tmp_path / "awk")
    upload_tree(tmp_path / "awk", f"{s3}/photos")
    assert main(["predict", *TINY, "--input", str(tmp_path / "awk"), "--out", str(tmp_path / "local.csv")]) == 0
    assert main(["predict", *TINY, "--input", f"{s3}/photos/", "--out", str(tmp_path / "remote.csv")]) == 0
    local, remote = pd.read_csv(tmp_path / "local.csv"), pd.read_csv(tmp_path / "remote.csv")
    assert len(local) == len(kinds) - 1  # the text file gets no row
    assert local.status.tolist().count("skipped") == 3  # corrupt, truncated, and a document named .jpg
    _same_rows(local, remote, f"{s3}/photos/")
    meta = json.loads((tmp_path / "remote.csv.meta.json").read_text())
    assert "testing" not in json.dumps(meta)  # no credential in what a run writes


@pytest.mark.slow
def test_imagenet_labels_from_the_keys_and_a_glob(tmp_path, s3):
    items = write_image_folder(tmp_path / "val", per_class=3)
    upload_tree(tmp_path / "val", f"{s3}/imagenet/val")
    local_args = ["eval", "imagenet", *TINY, "--data", str(tmp_path / "val"), "--out", str(tmp_path / "local.json")]
    assert main(local_args) == 0
    assert main(["eval", "imagenet", *TINY, "--data", f"{s3}/imagenet/val/", "--out", str(tmp_path / "remote.json")]) == 0
    local, remote = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "remote"))
    for key in ("top1", "top5", "num_images", "label_source", "mean_keep_ratio"):
        assert remote[key] == local[key], key
    assert remote["label_source"] == "imagenet_wnid" and remote["num_images"] == len(items)
    # a quoted glob picks the JPEGs only; labels still from the first folder below the glob's fixed part
    assert main(["predict", *TINY, "--input", f"{s3}/imagenet/val/*/*.JPEG", "--out", str(tmp_path / "glob.csv")]) == 0
    rows = pd.read_csv(tmp_path / "glob.csv")
    want = {f"{s3}/imagenet/val/{rel}": label for rel, label in items if rel.endswith(".JPEG")}
    assert dict(zip(rows["id"], rows["label"])) == want


def test_listing_reads_no_image_and_a_vanished_object_is_a_skipped_row(tmp_path, s3, monkeypatch):
    from nested_svit.data import objectstore
    from nested_svit.data.dataset import ImageRecordDataset
    from nested_svit.data.records import resolve_records
    from nested_svit.data.transforms import EvalTransform

    write_image_folder(tmp_path / "val", per_class=2)
    keys = upload_tree(tmp_path / "val", f"{s3}/val")
    with monkeypatch.context() as m:
        m.setattr(objectstore, "read_object", lambda uri: pytest.fail(f"listing read {uri}"))
        fs, _ = objectstore.filesystem(s3)
        m.setattr(type(fs), "cat_file", lambda *a, **k: pytest.fail("listing read an object"))
        records = resolve_records(f"{s3}/val/")
    assert records.ids == [f"{s3}/{k}" for k in keys] and records.keys == [k.split("/", 1)[1] for k in keys]
    before = records.digest()
    assert resolve_records(f"{s3}/val/").digest() == before  # what a resumed run compares: stable
    bucket = s3[len("s3://"):]
    s3_client().delete_object(Bucket=bucket, Key=keys[0])
    item = ImageRecordDataset(records, EvalTransform(64))[0]
    assert item["image"] is None and item["error"].startswith(f"image not found: {s3}/{keys[0]}: not found")
    assert ImageRecordDataset(records, EvalTransform(64))[1]["error"] is None
    s3_client().put_object(Bucket=bucket, Key=keys[1], Body=b"changed")  # a resumed run must see this
    assert resolve_records(f"{s3}/val/").digest() != before


def test_a_missing_bucket_and_absent_credentials_are_one_line(tmp_path, s3, monkeypatch, capsys):
    out = str(tmp_path / "p.csv")
    assert main(["predict", *TINY, "--input", "s3://no-such-bucket-here/val/", "--out", out]) == 2
    assert main(["predict", *TINY, "--input", "s3://", "--out", out]) == 2
    empty = s3 + "/nothing/"
    assert main(["predict", *TINY, "--input", empty, "--out", out]) == 2
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert main(["predict", *TINY, "--input", f"{s3}/val/", "--out", out]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 4 and "Traceback" not in err, err
    assert "s3://no-such-bucket-here/val/: the bucket does not exist" in lines[0]
    assert "s3://: give a bucket and a prefix" in lines[1]
    assert f"no images found under {empty}" in lines[2]
    assert "no credentials found" in lines[3] and "AWS_ACCESS_KEY_ID" in lines[3]


def test_a_manifest_on_s3_and_a_local_csv_give_the_folder_rows(tmp_path, s3):
    """A parquet manifest in the bucket (URIs, labels, ids, one object that does not exist) and a local CSV
    of relative paths under --uri-column: each image's row is the folder run's, the ids and labels the
    manifest's, the missing object a skipped row with the reason."""
    import io

    items = write_image_folder(tmp_path / "val", per_class=2)
    upload_tree(tmp_path / "val", f"{s3}/val")
    assert main(["predict", *TINY, "--input", str(tmp_path / "val"), "--out", str(tmp_path / "folder.csv")]) == 0
    folder = pd.read_csv(tmp_path / "folder.csv").set_index("id")
    manifest = pd.DataFrame({"uri": [f"{s3}/val/{rel}" for rel, _ in items] + [f"{s3}/val/gone.jpg"],
                             "label": [label for _, label in items] + [-1],
                             "id": [f"img-{n}" for n in range(len(items))] + ["gone"]})
    body = io.BytesIO()
    manifest.to_parquet(body, index=False)
    s3_client().put_object(Bucket=s3[len("s3://"):], Key="lists/val.parquet", Body=body.getvalue())
    assert main(["predict", *TINY, "--input", f"{s3}/lists/val.parquet", "--out", str(tmp_path / "m.csv")]) == 0
    rows = pd.read_csv(tmp_path / "m.csv")
    assert rows["id"].tolist() == manifest["id"].tolist()
    assert rows["label"].tolist() == manifest["label"].tolist()
    gone = rows.set_index("id").loc["gone"]
    assert gone["status"] == "skipped" and f"{s3}/val/gone.jpg: not found" in gone["error"]
    for n, (rel, _) in enumerate(items):
        got, want = rows.set_index("id").loc[f"img-{n}"], folder.loc[rel]
        assert got["top1_id"] == want["top1_id"] and abs(got["top1_prob"] - want["top1_prob"]) <= 1e-6
    pd.DataFrame({"path": [rel for rel, _ in items]}).to_csv(tmp_path / "val" / "list.csv", index=False)
    assert main(["predict", *TINY, "--input", str(tmp_path / "val" / "list.csv"), "--uri-column", "path",
                 "--out", str(tmp_path / "c.csv")]) == 0
    local = pd.read_csv(tmp_path / "c.csv").set_index("id")
    assert sorted(local.index) == sorted(folder.index)
    assert (local.loc[folder.index, "top1_id"] == folder["top1_id"]).all() and local["label"].eq(-1).all()


def test_bad_manifests_are_one_line(tmp_path, capsys):
    cases = {"nocol.csv": "file,label\na.jpg,1\n", "labels.csv": "uri,label\na.jpg,cat\n",
             "dupes.csv": "uri,id\na.jpg,x\nb.jpg,x\n", "empty.csv": "uri\na.jpg\n\"\"\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        assert main(["predict", *TINY, "--input", str(tmp_path / name), "--out", str(tmp_path / "p.csv")]) == 2
    assert main(["predict", *TINY, "--input", str(tmp_path), "--uri-column", "uri", "--out", str(tmp_path / "p.csv")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 5, err
    assert "no column 'uri'" in err[0] and "--uri-column" in err[0]
    assert "class indices" in err[1] and "ids must be unique" in err[2] and "is empty in 1 row" in err[3]
    assert "is not one" in err[4]
    with pytest.raises(SystemExit) as stop:  # eval coco's images are its annotation file's: no manifest flag
        main(["eval", "coco", "--model", "svit_adapter_tiny_maskrcnn", "--data", str(tmp_path), "--uri-column", "uri"])
    assert stop.value.code == 2 and "unrecognized arguments: --uri-column" in capsys.readouterr().err


@pytest.mark.slow
def test_hugging_face_shards_at_a_prefix_give_the_local_rows(tmp_path, s3):
    from datasets_fixtures import write_parquet

    write_parquet(tmp_path / "hf" / "data", n=10, shards=2)
    upload_tree(tmp_path / "hf", f"{s3}/hf")
    assert main(["predict", *TINY, "--input", str(tmp_path / "hf"), "--out", str(tmp_path / "local.csv")]) == 0
    assert main(["predict", *TINY, "--input", f"{s3}/hf/", "--out", str(tmp_path / "remote.csv")]) == 0
    local, remote = pd.read_csv(tmp_path / "local.csv"), pd.read_csv(tmp_path / "remote.csv")
    assert len(remote) == 10 and remote["label"].tolist() == local["label"].tolist()
    assert remote["id"].tolist() == local["id"].tolist()  # row numbers of the data set, as locally
    _same_rows(local, remote, "")


@pytest.mark.slow
def test_a_killed_run_over_s3_inputs_resumes_with_one_row_per_image(tmp_path, s3, kill_midway):
    """SIGKILL midway (the objects still being read), rerun: the committed batches are kept, every image
    has exactly one row, and the rows are an uninterrupted run's."""
    from procs import cli_command

    write_image_folder(tmp_path / "val", per_class=12)  # 36 images, 9 batches of 4
    upload_tree(tmp_path / "val", f"{s3}/val")
    args = ["predict", *TINY, "--input", f"{s3}/val/"]
    assert main([*args, "--out", str(tmp_path / "whole.parquet")]) == 0
    out = tmp_path / "resumed.parquet"
    committed = kill_midway(cli_command(*args, "--out", str(out)), tmp_path / "resumed.parquet.parts", at_least=2)
    assert 2 <= len(committed) < 9 and not out.exists()
    assert main([*args, "--out", str(out)]) == 0
    whole, resumed = pd.read_parquet(tmp_path / "whole.parquet"), pd.read_parquet(out)
    assert resumed["id"].is_unique and len(resumed) == 36
    _same_rows(whole, resumed, "")


def _parts_in(uri: str) -> list[str]:
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    listed = s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"].rsplit("/", 1)[-1] for o in listed if o["Key"].rsplit("/", 1)[-1].startswith("part-"))


def test_s3_in_s3_out_is_the_local_table(tmp_path, s3):
    kinds = write_awkward_folder(tmp_path / "awk")
    (tmp_path / "awk" / "000 broken.jpg").write_bytes(b"\xff\xd8 broken")  # the first part: a skipped image only
    upload_tree(tmp_path / "awk", f"{s3}/photos")
    args = ["predict", *TINY, "--batch-size", "2"]
    assert main([*args, "--input", str(tmp_path / "awk"), "--out", str(tmp_path / "local.parquet")]) == 0
    assert main([*args, "--input", f"{s3}/photos/", "--out", f"{s3}/preds/"]) == 0
    local = pd.read_parquet(tmp_path / "local.parquet")
    remote = pd.read_parquet(f"{s3}/preds/").sort_values("index").reset_index(drop=True)  # one table, by pandas
    assert len(remote) == len(kinds) and len(_parts_in(f"{s3}/preds/")) == (len(kinds) + 1) // 2
    exact = [c for c in local.columns if c not in ("id",) and not c.endswith("_prob")]
    pd.testing.assert_frame_equal(local[exact], remote[exact], check_dtype=False)
    assert remote["id"].tolist() == [f"{s3}/photos/{i}" for i in local["id"]]
    bucket = s3[len("s3://"):]
    names = {o["Key"] for o in s3_client().list_objects_v2(Bucket=bucket, Prefix="preds/")["Contents"]}
    assert {"preds/_SUCCESS", "preds/_manifest.json"} <= names and "preds/_nested_svit_run.json" not in names
    manifest = json.loads(s3_client().get_object(Bucket=bucket, Key="preds/_manifest.json")["Body"].read())
    assert manifest["rows"] == len(kinds) and "testing" not in json.dumps(manifest)


@pytest.mark.slow
def test_a_killed_run_resumes_on_the_object_store(tmp_path, s3):
    """SIGKILL once two parts are in the bucket, rerun: one row per image, the uninterrupted run's rows."""
    import signal
    import subprocess
    import time

    from procs import cli_command

    write_image_folder(tmp_path / "val", per_class=12)  # 36 images, 9 batches of 4
    upload_tree(tmp_path / "val", f"{s3}/val")
    args = ["predict", *TINY, "--input", f"{s3}/val/"]
    assert main([*args, "--out", str(tmp_path / "whole.parquet")]) == 0
    out = f"{s3}/preds/"
    proc = subprocess.Popen(cli_command(*args, "--out", out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(_parts_in(out)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = _parts_in(out)
    assert 2 <= len(committed) < 9
    assert main([*args, "--out", out]) == 0
    resumed = pd.read_parquet(out).sort_values("index").reset_index(drop=True)
    assert resumed["id"].is_unique and len(resumed) == 36
    _same_rows(pd.read_parquet(tmp_path / "whole.parquet"), resumed, "")


def test_bad_credentials_are_one_line_for_inputs_and_outputs(tmp_path, s3, monkeypatch, capsys):
    """The server checks signatures (moto's IAM authentication, switched on in its process): a key it does
    not know is one line naming the URI, for an input prefix (predict, eval) and a data set output; the
    objects of a manifest are skipped rows with the reason; no credential in what is said."""
    import moto.settings

    write_image_folder(tmp_path / "val", per_class=1)
    upload_tree(tmp_path / "val", f"{s3}/val")
    (tmp_path / "m.csv").write_text("uri\n" + "".join(f"{s3}/val/{p.relative_to(tmp_path / 'val').as_posix()}\n"
                                                     for p in sorted((tmp_path / "val").rglob("*.*"))))
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # every request from now on signed and checked
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAKEY00000WRONG")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-0123456789")
    capsys.readouterr()
    assert main(["predict", *TINY, "--input", f"{s3}/val/", "--out", str(tmp_path / "a.csv")]) == 2
    assert main(["eval", "imagenet", *TINY, "--data", f"{s3}/val/", "--out", str(tmp_path / "e.json")]) == 2
    assert main(["predict", *TINY, "--input", str(tmp_path / "val"), "--out", f"{s3}/preds/"]) == 2
    assert main(["predict", *TINY, "--input", str(tmp_path / "m.csv"), "--out", str(tmp_path / "m.parquet")]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 4 and "Traceback" not in err, err
    for line, uri in zip(lines, [f"{s3}/val/", f"{s3}/val/", f"{s3}/preds/"]):
        assert f"{uri}: access denied" in line, line
    # a manifest lists no prefix: each object it names is refused when read, a skipped row with the reason
    assert lines[3].startswith("error: every one of the 3 images was skipped") and "access denied" in lines[3]
    rows = pd.read_parquet(tmp_path / "m.parquet")
    assert (rows.status == "skipped").all() and rows.error.str.contains(": access denied").all()
    assert "WRONG" not in err and "not-the-secret" not in err
    assert not list(tmp_path.glob("a.csv*")) and not (tmp_path / "e.json").exists()
