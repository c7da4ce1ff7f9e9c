"""Fetch prompt sources from S3-compatible object stores (boto3).

The endpoint and the client come from the project's one resolver and factory
(:func:`rtdmd.artifacts.store.s3_endpoint` / :func:`~rtdmd.artifacts.store.s3_client`):
``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``, then ``METAFLOW_S3_ENDPOINT_URL`` (unset: AWS
itself), credentials only from the standard AWS environment/credential chain; nothing is read
from or written to committed files.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from rtdmd.artifacts.store import ENDPOINT_ENV, s3_client, s3_endpoint

__all__ = ["ENDPOINT_ENV", "endpoint_from_env", "fetch_s3", "s3_client", "split_s3_uri"]


def endpoint_from_env(env: dict | None = None) -> str | None:
    return s3_endpoint(env)


def split_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3://bucket/prefix URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def fetch_s3(uri: str, dest: str | Path, *, keep=None, max_objects: int = 10000) -> tuple[Path, list[dict]]:
    """Download ``s3://bucket/prefix`` under ``dest``; returns (local path, object list).

    If ``prefix`` names one object, that object is downloaded to ``dest/<basename>`` and the local
    file path is returned; otherwise every object under ``prefix/`` whose basename passes
    ``keep(name)`` is downloaded keeping its relative key, and the local directory is returned.
    Each object dict holds ``uri``, ``etag``, ``size`` and ``local``.
    """
    bucket, prefix = split_s3_uri(uri)
    client = s3_client()
    dest = Path(dest)
    objects = []
    if prefix and not prefix.endswith("/"):
        from botocore.exceptions import ClientError

        try:
            head = client.head_object(Bucket=bucket, Key=prefix)
        except ClientError:
            head = None
        if head is not None:
            key = Path(prefix)  # keep the parent folder: it names the dataset of a layout file
            local = dest / (key.parent.name or bucket) / key.name
            local.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, prefix, str(local))
            return local, [{"uri": uri, "etag": head.get("ETag", "").strip('"'), "size": head.get("ContentLength"), "local": str(local)}]
    base = prefix.rstrip("/") + "/" if prefix else ""
    root = dest / (Path(prefix.rstrip("/")).name or bucket)
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=base):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            rel = key[len(base):]
            if not rel or key.endswith("/") or (keep is not None and not keep(Path(rel).name)):
                continue
            if ".." in Path(rel).parts:
                raise ValueError(f"refusing object key with '..': s3://{bucket}/{key}")
            if len(objects) >= max_objects:
                raise ValueError(f"more than {max_objects} prompt objects under {uri}")
            local = root / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(local))
            objects.append({"uri": f"s3://{bucket}/{key}", "etag": obj.get("ETag", "").strip('"'), "size": obj.get("Size"), "local": str(local)})
    if not objects:
        raise FileNotFoundError(f"no prompt files under {uri} (endpoint {endpoint_from_env() or 'AWS default'})")
    return root, objects
