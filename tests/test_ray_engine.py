"""``predict --engine ray`` on one shared local Ray instance (``ray.init(num_cpus=4, ...)``: logical CPUs,
so decode tasks, actors and the driver's reads all get scheduled on a 2-core machine).

The guarantees, each a test: one row per input file; the rows equal the local engine's (same batches,
same per-batch code: ids, statuses, top-k ids, probabilities within 1e-5, detections); the work units
decode to exactly the local loader's batches for every input kind. Killed actors and drivers, in
processes of their own: tests/ray_resume_cases.py."""
from __future__ import annotations

import re
import sys

import numpy as np
import pandas as pd

import pytest
import torch

from datasets_fixtures import compare_rows, smooth_image, write_awkward_folder, write_image_folder, write_parquet
from nested_svit.cli.main import main

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[test]' brings it)")
pytestmark = pytest.mark.ray

TINY = ["--model", "svit_tiny", "--random-weights", "--img-size", "64", "--batch-size", "4"]
LOCAL = ["--workers", "0", "--threads", "2"]


@pytest.fixture(scope="module")
def cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, object_store_memory=256 * 2 ** 20, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.mark.slow
def test_awkward_folder_gives_the_local_rows(tmp_path, cluster):
    kinds = write_awkward_folder(tmp_path / "in")
    smooth_image(np.random.default_rng(1), (64, 48)).save(tmp_path / "in" / "日本 photo (1).jpg")
    args = ["predict", *TINY, "--input", str(tmp_path / "in")]
    assert main([*args, *LOCAL, "--out", str(tmp_path / "local.parquet")]) == 0
    assert main([*args, "--engine", "ray", "--actors", "2", "--out", str(tmp_path / "ray.parquet")]) == 0
    local, remote = pd.read_parquet(tmp_path / "local.parquet"), pd.read_parquet(tmp_path / "ray.parquet")
    files = sorted(p.name for p in (tmp_path / "in").iterdir())
    assert len(remote) == len(files) - 1 == len(kinds)  # notes.txt is listed as ignored, the rest get one row each
    assert remote["id"].is_unique and sorted(remote["id"]) == sorted(set(files) - {"notes.txt"})
    assert set(remote.loc[remote.status == "skipped", "id"]) == {"truncated.jpg", "corrupt.jpg", "document.jpg"}
    compare_rows(local, remote)
    assert not (tmp_path / "ray.parquet.parts").exists()


@pytest.mark.slow
def test_valid_labels_reach_the_actors(tmp_path, cluster):
    """--valid-labels restricts the softmax and top-k in the batch step, so the actors' rows are the local ones."""
    from nested_svit.data.testset_labels import valid_labels

    write_image_folder(tmp_path / "val", per_class=3)
    args = ["predict", *TINY, "--input", str(tmp_path / "val"), "--valid-labels", "imagenet-a"]
    assert main([*args, *LOCAL, "--out", str(tmp_path / "local.parquet")]) == 0
    assert main([*args, "--engine", "ray", "--actors", "2", "--out", str(tmp_path / "ray.parquet")]) == 0
    local, remote = pd.read_parquet(tmp_path / "local.parquet"), pd.read_parquet(tmp_path / "ray.parquet")
    ids = remote[[f"top{r}_id" for r in range(1, 6)]].to_numpy()
    assert np.isin(ids, valid_labels("imagenet-a", 1000)).all()
    compare_rows(local, remote)


@pytest.mark.slow
def test_capacity_reruns_in_the_actors_are_counted_and_said(tmp_path, cluster, capsys):
    """--capacity 1 with random gates (they keep more than their targets): batches overflow in the actors, are
    rerun there, and the summary counts them as the local run does; the rows are the exact ones."""
    write_image_folder(tmp_path / "val", per_class=3)  # 9 images: 3 batches of 4
    args = ["predict", *TINY, "--input", str(tmp_path / "val")]
    assert main([*args, *LOCAL, "--out", str(tmp_path / "exact.parquet")]) == 0
    small = ["--capacity", "1"]
    assert main([*args, *LOCAL, *small, "--out", str(tmp_path / "local.parquet")]) == 0
    assert main([*args, *small, "--engine", "ray", "--actors", "2", "--out", str(tmp_path / "ray.parquet")]) == 0
    out = capsys.readouterr().out
    said = re.findall(r"--capacity 1: (\d+) batch\(es\) rerun \(", out)
    assert len(said) == 2 and all(int(n) >= 1 for n in said), said  # each actor keeps its own estimate
    exact = pd.read_parquet(tmp_path / "exact.parquet")
    compare_rows(exact, pd.read_parquet(tmp_path / "local.parquet"))
    compare_rows(exact, pd.read_parquet(tmp_path / "ray.parquet"))


@pytest.mark.slow
def test_detector_rows_equal_local_in_jsonl(tmp_path, cluster, tiny_detector_file):
    from coco_fixtures import make_coco

    _, images = make_coco(tmp_path / "coco", corrupt=1)
    args = ["predict", "--checkpoint", str(tiny_detector_file), "--input", str(images), "--batch-size", "2"]
    assert main([*args, *LOCAL, "--out", str(tmp_path / "local.jsonl")]) == 0
    # the same torch threads as the local run (2): the same GEMM reduction order, so the same floats; two
    # such actors take all 4 CPUs, so the decode has to run inside them (fused) or nothing is ever decoded
    ray_args = ["--engine", "ray", "--actors", "2", "--cpus-per-actor", "2"]
    assert main([*args, *ray_args, "--out", str(tmp_path / "ray.jsonl")]) == 0
    local = pd.read_json(tmp_path / "local.jsonl", lines=True)
    remote = pd.read_json(tmp_path / "ray.jsonl", lines=True)
    assert len(remote) == 5 and remote.status.tolist().count("skipped") == 1
    pd.testing.assert_frame_equal(local, remote)  # boxes, scores, labels and RLE masks: the same computation


@pytest.mark.parametrize("kind", ["folder", "imagefolder", "file", "glob", "list", "parquet"])
def test_work_units_decode_to_the_local_batches(tmp_path, kind):
    """Without a cluster: every input kind's units decode (``decode_unit``) to exactly the batches the
    local DataLoader makes from the same data set."""
    import pickle

    from nested_svit.data import EvalTransform, open_dataset
    from nested_svit.data.dataset import collate_records
    from nested_svit.ray.units import decode_unit, template_of, work_units

    write_image_folder(tmp_path / "tree", per_class=2)
    files = sorted((tmp_path / "tree").rglob("*.*"))
    (tmp_path / "list.txt").write_text("\n".join(str(f) for f in files))
    write_parquet(tmp_path / "hf", n=5)
    source = {"folder": tmp_path / "tree" / "n01440764", "imagefolder": tmp_path / "tree", "file": files[0],
              "glob": f"{tmp_path / 'tree'}/*/*.JPEG", "list": tmp_path / "list.txt", "parquet": tmp_path / "hf"}[kind]
    t = EvalTransform(img_size=32)
    dataset = open_dataset(source, t.crop, exif=True)
    batches = [list(range(i, min(i + 2, len(dataset)))) for i in range(0, len(dataset), 2)]
    template = template_of(dataset)
    for unit in work_units(dataset, batches, 2):
        got = pickle.loads(decode_unit(unit, template)["payload"])
        expected = collate_records([dataset[i] for i in unit["index"]])
        assert got.keys() == expected.keys()
        for key in expected:
            if isinstance(expected[key], torch.Tensor):
                assert torch.equal(got[key], expected[key]), key
            else:
                assert got[key] == expected[key], key


def test_flags_the_ray_engine_cannot_honour_are_refused(tmp_path, capsys):
    write_image_folder(tmp_path / "in", per_class=1)
    base = ["predict", *TINY, "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o.parquet")]
    for extra, words in ((["--engine", "ray", "--save-vis", str(tmp_path / "v")], "--save-vis is not supported"),
                         (["--engine", "ray", "--calibrate", "4"], "--calibrate is not supported"),
                         (["--engine", "ray", "--device", "cuda:1"], "--device is not supported"),
                         (["--engine", "ray", "--threads", "3"], "--threads is not supported"),
                         (["--engine", "ray", "--cpus-per-actor", "0"], "--cpus-per-actor > 0"),
                         (["--engine", "ray", "--decode-cpus", "nan"], "--decode-cpus must be > 0"),
                         (["--decode-cpus", "2"], "only apply to --engine ray"),
                         (["--actors", "2"], "only apply to --engine ray"),
                         (["--cpus-per-actor", "1"], "only apply to --engine ray")):  # even the default value
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err


def test_an_address_nothing_listens_on_and_a_missing_extra_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    from nested_svit.ray.engine import _check_reachable

    with pytest.raises(ValueError, match="no Ray cluster answers at --ray-address 127.0.0.1:1"):
        _check_reachable("127.0.0.1:1", timeout=2)  # ray.init would retry it for minutes
    with pytest.raises(ValueError, match="auto or HOST:PORT"):
        _check_reachable("head:port")
    write_image_folder(tmp_path / "in", per_class=1)
    monkeypatch.setitem(sys.modules, "ray", None)  # the extra is not installed
    assert main(["predict", *TINY, "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o.csv"),
                 "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --engine ray needs Ray Data: pip install -e '.[ray]' (ray[data]==2.60.0)"


def test_decode_cpus_size_the_decode_tasks_of_gpu_actors_only():
    """GPU actors: decode tasks of --decode-cpus (default 1), counted in the CPUs the run needs; CPU actors
    decode inside themselves with their own CPUs, and a --decode-cpus given for them is said to be unused."""
    import warnings

    from nested_svit.ray.engine import RayOptions, _check_decode_cpus, _decode_cpus

    assert _decode_cpus(RayOptions(cpus_per_actor=2), gpus_per_actor=1) == 1.0
    assert _decode_cpus(RayOptions(cpus_per_actor=2, decode_cpus=3), gpus_per_actor=0.5) == 3
    assert _decode_cpus(RayOptions(cpus_per_actor=2, decode_cpus=3), gpus_per_actor=0) == 2  # fused into the actor
    with pytest.warns(UserWarning, match="--decode-cpus 3 is for the decode tasks of GPU actors"):
        _check_decode_cpus(RayOptions(cpus_per_actor=2, decode_cpus=3), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_decode_cpus(RayOptions(decode_cpus=3), 1)
        _check_decode_cpus(RayOptions(), 0)


def test_a_local_instance_is_a_new_one_and_ray_address_is_the_cluster_to_join(tmp_path, capsys, monkeypatch):
    """Without --ray-address the run starts its own instance (``address="local"``): a plain ``ray.init``
    joins whatever /tmp/ray/ray_current_cluster names (any cluster once started on the machine, alive or
    gone) and refused our num_cpus. RAY_ADDRESS (set by ``ray job submit``) is the cluster to join."""
    from nested_svit.ray.engine import RayOptions, _connect

    calls: list[dict] = []

    class NoRay:
        def is_initialized(self):
            return False

        def init(self, **kwargs):
            calls.append(kwargs)

    assert _connect(NoRay(), RayOptions()) is True and calls[-1]["address"] == "local"
    write_image_folder(tmp_path / "in", per_class=1)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing listens there
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process, whatever this one joined
    capsys.readouterr()
    assert main(["predict", *TINY, "--input", str(tmp_path / "in"), "--engine", "ray",
                 "--out", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no Ray cluster answers at --ray-address 127.0.0.1:1" in errors[0], err
    assert "Traceback" not in err
