"""Artifact store: publish/fetch checksummed directories to a local root or ``s3://`` prefix.

Layout (DESIGN.md §4): ``<root>/<flow run>/<stage>/`` — keyed by logical run and stage, never by
attempt. Publication protocol:

* local: build in a temp dir, write ``manifest.json``, then rename into place (atomic);
* S3 (no rename): upload every file, then ``manifest.json`` **last**. A reader requires the
  manifest and verifies each file's sha256 and size, so an interrupted upload (no manifest, or
  a manifest whose files are missing/different) is never accepted.

The S3 endpoint comes from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` /
``METAFLOW_S3_ENDPOINT_URL`` so any S3-compatible server works; credentials from the standard
AWS environment only.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from rtdmd.artifacts.fs import (MANIFEST, ArtifactError, atomic_dir, check_manifest_paths, verify_manifest,
                               write_manifest)


def s3_endpoint() -> str | None:
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "METAFLOW_S3_ENDPOINT_URL"):
        if os.environ.get(key):
            return os.environ[key]
    return None


def s3_client():
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=s3_endpoint(),
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60),
    )


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ArtifactError(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/").rstrip("/")


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(root: str, *parts: str) -> str:
    root = str(root).rstrip("/")
    return "/".join([root, *[p.strip("/") for p in parts if p]])


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=4)


def publish_dir(local_dir: str | Path, uri: str, fields: dict | None = None) -> dict:
    """Publish ``local_dir`` to ``uri`` (local path or s3://) with a manifest; returns the manifest.

    ``fields`` are merged into the manifest (stage, backbone, parent, ...). The source dir is
    left untouched.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise ArtifactError(f"cannot publish {local_dir}: not a directory")
    if is_s3(uri):
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / "a"
            shutil.copytree(local_dir, staged)
            (staged / MANIFEST).unlink(missing_ok=True)
            manifest = write_manifest(staged, fields)
            bucket, prefix = split_s3(uri)
            client = s3_client()
            # an existing manifest would make a half-overwritten artifact look complete: drop it first
            client.delete_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")
            cfg = _transfer_config()
            for rel in manifest["files"]:
                client.upload_file(str(staged / rel), bucket, f"{prefix}/{rel}", Config=cfg)
            client.upload_file(str(staged / MANIFEST), bucket, f"{prefix}/{MANIFEST}", Config=cfg)
            return manifest
    target = Path(uri)
    with atomic_dir(target) as tmp:
        shutil.copytree(local_dir, tmp, dirs_exist_ok=True)
        (tmp / MANIFEST).unlink(missing_ok=True)
        manifest = write_manifest(tmp, fields)
    return manifest


def fetch_dir(uri: str, cache_dir: str | Path | None = None) -> Path:
    """Return a local, checksum-verified copy of the artifact at ``uri``."""
    if not is_s3(uri):
        path = Path(uri)
        if not path.is_dir():
            raise ArtifactError(f"artifact {uri} does not exist")
        verify_manifest(path)
        return path
    bucket, prefix = split_s3(uri)
    client = s3_client()
    try:
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read()
    except client.exceptions.NoSuchKey:
        raise ArtifactError(f"artifact {uri} has no {MANIFEST}: it does not exist or its upload never completed") from None
    except Exception as exc:  # endpoint unreachable, bucket missing, auth
        raise ArtifactError(f"cannot read {uri}/{MANIFEST}: {exc}") from None
    try:
        manifest = check_manifest_paths(json.loads(body), f"{uri}/{MANIFEST}")
    except ValueError as exc:
        raise ArtifactError(f"{uri}/{MANIFEST} is not valid JSON ({exc})") from None
    cache_root = Path(cache_dir or tempfile.mkdtemp(prefix="rtdmd-artifact-"))
    target = cache_root / prefix.replace("/", "__")
    with atomic_dir(target) as tmp:
        cfg = _transfer_config()
        for rel in manifest.get("files", {}):
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                client.download_file(bucket, f"{prefix}/{rel}", str(dest), Config=cfg)
            except Exception as exc:
                raise ArtifactError(f"artifact {uri}: file {rel} listed in the manifest cannot be fetched ({exc})") from None
        (tmp / MANIFEST).write_bytes(body)
        verify_manifest(tmp)
    return target


def artifact_exists(uri: str) -> bool:
    if not is_s3(uri):
        return (Path(uri) / MANIFEST).is_file()
    bucket, prefix = split_s3(uri)
    try:
        s3_client().head_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")
        return True
    except Exception:
        return False


def read_remote_manifest(uri: str) -> dict:
    if not is_s3(uri):
        from rtdmd.artifacts.fs import read_manifest

        return read_manifest(uri)
    bucket, prefix = split_s3(uri)
    try:
        manifest = json.loads(s3_client().get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read())
    except Exception as exc:
        raise ArtifactError(f"cannot read manifest of {uri}: {exc}") from None
    return check_manifest_paths(manifest, f"{uri}/{MANIFEST}")
