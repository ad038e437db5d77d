"""A real S3 server on loopback for the object store tests: moto's server mode on 127.0.0.1, one per test
session, configured for the code under test only through the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), as a user's shell would."""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import pytest

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@pytest.fixture(scope="session")
def s3_endpoint():
    moto_server = pytest.importorskip("moto.server", reason="the test extra brings moto[server]")
    pytest.importorskip("s3fs", reason="the test extra brings s3fs")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A fresh bucket on the loopback server, the environment pointing at it -> ``s3://<bucket>``."""
    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


def s3_client():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def upload_tree(local: Path, uri: str) -> list[str]:
    """Every file under ``local`` to ``uri`` (``s3://bucket/prefix``) at the same relative key -> the keys."""
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    client, keys = s3_client(), []
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        key = "/".join(filter(None, [prefix.strip("/"), path.relative_to(local).as_posix()]))
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        keys.append(key)
    return keys
