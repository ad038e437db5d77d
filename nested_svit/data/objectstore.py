"""Images in object storage: ``s3://bucket/prefix/`` (or ``gs://``, ... any protocol fsspec knows and whose
package is installed), a prefix or a quoted glob. Listing reads keys, sizes and ETags only, never an
image; each image is one GET when its loader worker decodes it, so reads are streamed and as parallel as
the loader's workers.

The filesystem layer is fsspec (``s3fs`` for S3; the ``s3`` extra pins both): ``datasets`` already rests on
fsspec, so one layer serves Hugging Face shards and images, and botocore underneath reads the standard
configuration only (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, ``~/.aws/config`` and ``credentials``). Nothing here takes or
records a credential.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_GLOB = re.compile(r"[*?\[]")
_CONFIG_VARS = ("AWS_", "GOOGLE_", "FSSPEC_")  # environment that configures a filesystem: part of its cache key
_EXTRAS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


def is_uri(text: str | os.PathLike) -> bool:
    """Whether ``text`` names an object store location (``s3://...``), not a local path (``file://`` is local)."""
    match = _SCHEME.match(str(text))
    return bool(match) and match.group(1).lower() != "file"


@dataclass(frozen=True)
class StoredObject:
    """One listed object: its ``uri``, its ``key`` below the listed prefix (``<class>/<image>``), and a
    ``stamp`` that changes when the object does (size and ETag)."""

    uri: str
    key: str
    stamp: str


_filesystems: dict[tuple, Any] = {}


def filesystem(uri: str):
    """-> (fsspec filesystem, path without the protocol). One instance per protocol, process and
    configuring environment (a changed ``AWS_*`` variable gets a new client, not a cached one)."""
    import fsspec

    scheme = _SCHEME.match(uri).group(1).lower()
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_CONFIG_VARS)))
    key = (scheme, os.getpid(), env)
    try:
        fs = _filesystems.get(key)
        if fs is None:
            fs = _filesystems[key] = fsspec.filesystem(scheme, skip_instance_cache=True)
    except ImportError as e:
        package = _EXTRAS.get(scheme)
        how = "pip install 'nested-svit[s3]'" if package == "s3fs" else f"pip install {package}" if package else \
            f"install the fsspec package for {scheme}://"
        raise ValueError(f"{uri}: reading {scheme}:// needs {package or 'an fsspec filesystem'} ({how})") from e
    except ValueError as e:
        raise ValueError(f"{uri}: {e}") from e
    return fs, fs._strip_protocol(uri)


def describe_error(uri: str, error: BaseException) -> str:
    """One line for what went wrong reaching ``uri`` (no credential in it)."""
    name = type(error).__name__
    text = str(error).strip().splitlines()[0] if str(error).strip() else name
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return (f"{uri}: no credentials found for it: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                "or ~/.aws/credentials")
    if isinstance(error, PermissionError):
        return f"{uri}: access denied ({text}): check the credentials and the bucket's policy"
    if isinstance(error, FileNotFoundError):
        bucket_missing = "bucket" in text.lower()
        return f"{uri}: {'the bucket does not exist' if bucket_missing else 'not found'} ({text})"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or isinstance(error, ConnectionError):
        return f"{uri}: cannot reach the object store ({text}); AWS_ENDPOINT_URL is {os.environ.get('AWS_ENDPOINT_URL', 'unset')}"
    return f"{uri}: {name}: {text}"


def list_objects(uri: str) -> list[StoredObject]:
    """The objects under a prefix (``s3://b/val/``: everything below it) or matching a glob
    (``s3://b/val/*/*.JPEG``), sorted by key; no object is read. A missing bucket, absent credentials or
    a refused listing is a ValueError of one line."""
    fs, path = filesystem(uri)
    if not path.strip("/"):
        raise ValueError(f"{uri}: give a bucket and a prefix (s3://bucket/val/)")
    globbed = bool(_GLOB.search(path))
    try:
        found = fs.glob(path, detail=True) if globbed else fs.find(path, detail=True)
    except Exception as e:  # botocore's and fsspec's errors, each said in one line
        raise ValueError(describe_error(uri, e)) from e
    root = path.split("*")[0].rsplit("/", 1)[0] if globbed else path.rstrip("/")
    objects = []
    for name in sorted(found):
        info = found[name]
        if info.get("type") == "directory":
            continue
        key = name[len(root):].lstrip("/") if name.startswith(root) else name.rsplit("/", 1)[-1]
        stamp = f"{info.get('size')}:{info.get('ETag') or info.get('etag') or info.get('LastModified') or info.get('mtime')}"
        objects.append(StoredObject(fs.unstrip_protocol(name), key or name.rsplit("/", 1)[-1], stamp))
    return objects


def read_object(uri: str) -> bytes:
    """The bytes of one object (one GET). Raises ``FileNotFoundError`` / ``OSError`` with a one-line reason."""
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(describe_error(uri, e)) from e
    except Exception as e:
        raise OSError(describe_error(uri, e)) from e
