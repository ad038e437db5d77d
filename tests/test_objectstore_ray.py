"""``predict --engine ray`` reading images from the loopback S3 server: the decode tasks read each object
with the configuration of the node they run on (here a local instance started after the environment points
at the server, as a user's shell would), and the rows are the local engine's."""
from __future__ import annotations

import os

import pytest

from datasets_fixtures import write_awkward_folder
from s3_fixtures import S3_ENV, s3_client, upload_tree
from test_objectstore import TINY, _same_rows
from nested_svit.cli.main import main

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[test]' brings it)")
pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def s3_cluster(s3_endpoint):
    """The environment set for the whole module, then a local Ray instance that inherits it -> a bucket."""
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint})
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, object_store_memory=256 * 2 ** 20, include_dashboard=False, log_to_driver=False)
    s3_client().create_bucket(Bucket="ray-inputs")
    yield "s3://ray-inputs"
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_ray_rows_from_s3_equal_the_local_rows(tmp_path, s3_cluster):
    import pandas as pd

    write_awkward_folder(tmp_path / "awk")
    upload_tree(tmp_path / "awk", f"{s3_cluster}/awk")
    model = TINY[:TINY.index("--workers")]  # the model and batch; loader workers and threads are local flags
    args = ["predict", *model, "--input", f"{s3_cluster}/awk/"]
    assert main([*args, "--workers", "2", "--threads", "2", "--out", str(tmp_path / "local.csv")]) == 0
    assert main([*args, "--engine", "ray", "--actors", "2", "--out", str(tmp_path / "ray.csv")]) == 0
    local, remote = pd.read_csv(tmp_path / "local.csv"), pd.read_csv(tmp_path / "ray.csv")
    assert remote.status.tolist().count("skipped") == 3
    local["id"] = [i[len(f"{s3_cluster}/awk/"):] for i in local["id"]]
    _same_rows(local, remote, f"{s3_cluster}/awk/")


def test_ray_from_s3_to_s3_is_the_local_table(tmp_path, s3_cluster):
    import pandas as pd

    from datasets_fixtures import write_image_folder

    write_image_folder(tmp_path / "val", per_class=3)
    upload_tree(tmp_path / "val", f"{s3_cluster}/val")
    model = TINY[:TINY.index("--workers")]
    assert main(["predict", *model, "--workers", "2", "--threads", "2", "--input", str(tmp_path / "val"),
                 "--out", str(tmp_path / "local.parquet")]) == 0
    out = f"{s3_cluster}/preds/"
    assert main(["predict", *model, "--input", f"{s3_cluster}/val/", "--engine", "ray", "--actors", "2", "--out", out]) == 0
    local = pd.read_parquet(tmp_path / "local.parquet")
    remote = pd.read_parquet(out).sort_values("index").reset_index(drop=True)
    _same_rows(local, remote, f"{s3_cluster}/val/")
