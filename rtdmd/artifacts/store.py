"""Artifact store: publish/fetch checksummed directories to a local root or ``s3://`` prefix.

Layout (DESIGN.md §4): ``<root>/<flow run>/<stage>/`` — keyed by logical run and stage, never by
attempt. Publication protocol:

* local: build in a temp dir, write ``manifest.json``, then rename into place (atomic);
* S3 (no rename): upload every file, then ``manifest.json`` **last**. A reader requires the
  manifest and verifies each file's sha256 and size, so an interrupted upload (no manifest, or
  a manifest whose files are missing/different) is never accepted.

Transfers run concurrently through boto3's transfer manager (all files of an artifact at once,
multipart for large ones). A fetch into a cache directory reuses every cached file whose sha256
matches the manifest: an unchanged artifact costs one GET (the manifest) and no payload GET.
Prefix deletion (checkpoint pruning) uses batched ``DeleteObjects`` (1000 keys per request).

This module is the project's one S3 client factory (:func:`s3_client`) and one endpoint
resolver (:func:`s3_endpoint`): ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``, then
``METAFLOW_S3_ENDPOINT_URL`` (unset: AWS itself), so any S3-compatible server works;
credentials from the standard AWS environment only.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping
from urllib.parse import urlparse

from rtdmd.artifacts.fs import (MANIFEST, ArtifactError, atomic_dir, build_manifest, check_manifest_paths,
                               manifest_text, sha256_file, verify_manifest, write_manifest)

ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "METAFLOW_S3_ENDPOINT_URL")
MAX_CONCURRENCY = 8  # files in flight per transfer manager (and connections per client)
DELETE_BATCH = 1000  # the S3 DeleteObjects limit


def s3_endpoint(env: Mapping[str, str] | None = None) -> str | None:
    """The S3 endpoint URL from the environment (first set of :data:`ENDPOINT_ENV`), or None."""
    env = os.environ if env is None else env
    for key in ENDPOINT_ENV:
        if env.get(key):
            return env[key]
    return None


def s3_client(*, timeout: float = 60.0, connect_timeout: float = 5.0, attempts: int = 3):
    """A boto3 S3 client for :func:`s3_endpoint` (thread-safe: one serves a whole transfer)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=s3_endpoint(),
        config=Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=connect_timeout,
                      read_timeout=timeout, max_pool_connections=4 * MAX_CONCURRENCY),
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


def _transfer_config(files: int = 1):
    """16 MiB multipart chunks; ``MAX_CONCURRENCY`` parts in flight per file, for up to 4 files at
    once (one manager moves all of an artifact's files, as that many per-file transfers would)."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20,
                          max_concurrency=MAX_CONCURRENCY * max(1, min(int(files), 4)))


def _transfer_all(client, calls: list[tuple[str, str, str, str]]) -> None:
    """Run ``(op, local path, bucket, key)`` uploads/downloads concurrently; raise the first error
    as :class:`ArtifactError` naming the key (after every transfer has finished)."""
    from boto3.s3.transfer import create_transfer_manager

    if not calls:
        return
    with create_transfer_manager(client, _transfer_config(len(calls))) as tm:
        futures = [(key, tm.upload(path, bucket, key) if op == "upload" else tm.download(bucket, key, path))
                   for op, path, bucket, key in calls]
        errors = []
        for key, fut in futures:
            try:
                fut.result()
            except Exception as exc:  # noqa: BLE001 - reported with its key below
                errors.append((key, exc))
    if errors:
        key, exc = errors[0]
        raise ArtifactError(f"s3 transfer of {key} failed ({exc})" + (f"; {len(errors) - 1} more failed" if len(errors) > 1 else ""))


def publish_dir(local_dir: str | Path, uri: str, fields: dict | None = None) -> dict:
    """Publish ``local_dir`` to ``uri`` (local path or s3://) with a manifest; returns the manifest.

    ``fields`` are merged into the manifest (stage, backbone, parent, ...). The source dir is
    left untouched.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise ArtifactError(f"cannot publish {local_dir}: not a directory")
    if is_s3(uri):
        # uploaded from the source itself (no staging copy): a file changed between hashing and
        # upload fails every reader's checksum, so it can never pass as the manifest's file
        manifest = build_manifest(local_dir, fields)
        bucket, prefix = split_s3(uri)
        client = s3_client()
        # an existing manifest would make a half-overwritten artifact look complete: drop it first
        client.delete_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")
        _transfer_all(client, [("upload", str(local_dir / rel), bucket, f"{prefix}/{rel}") for rel in manifest["files"]])
        client.put_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}", Body=manifest_text(manifest).encode())
        return manifest
    target = Path(uri)
    with atomic_dir(target) as tmp:
        shutil.copytree(local_dir, tmp, dirs_exist_ok=True)
        (tmp / MANIFEST).unlink(missing_ok=True)
        manifest = write_manifest(tmp, fields)
    return manifest


def _reusable(cached: Path, rel: str, info: dict) -> bool:
    """Is ``cached/rel`` the manifest's file (size, then sha256)?"""
    path = cached / rel
    return path.is_file() and path.stat().st_size == info.get("bytes") and sha256_file(path) == info.get("sha256")


def fetch_dir(uri: str, cache_dir: str | Path | None = None) -> Path:
    """Return a local, checksum-verified copy of the artifact at ``uri``.

    With ``cache_dir`` the copy lives at ``<cache_dir>/<prefix with / -> __>``; files already
    there with the manifest's sha256 are reused (no GET), the others are downloaded.
    """
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
    files = manifest.get("files", {})
    cache_root = Path(cache_dir or tempfile.mkdtemp(prefix="rtdmd-artifact-"))
    target = cache_root / prefix.replace("/", "__")
    if (target / MANIFEST).is_file() and (target / MANIFEST).read_bytes() == body:
        try:
            verify_manifest(target)
            return target  # cache hit: every file matches the manifest
        except ArtifactError:
            pass  # a cached file was changed or removed: rebuild below, reusing what still matches
    with atomic_dir(target) as tmp:
        calls = []
        for rel, info in files.items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if _reusable(target, rel, info):
                shutil.copy2(target / rel, dest)
            else:
                calls.append(("download", str(dest), bucket, f"{prefix}/{rel}"))
        try:
            _transfer_all(client, calls)
        except ArtifactError as exc:
            raise ArtifactError(f"artifact {uri}: a file listed in the manifest cannot be fetched: {exc}") from None
        (tmp / MANIFEST).write_bytes(body)
        verify_manifest(tmp)
    return target


def delete_prefix(uri: str, *, first: tuple[str, ...] = ()) -> int:
    """Delete every object under ``uri`` (an ``s3://`` prefix) with batched ``DeleteObjects``;
    the keys in ``first`` (relative, e.g. a completeness marker) are deleted before the rest, so
    a reader never sees a marker without its files. Returns the number of objects deleted."""
    bucket, prefix = split_s3(uri)
    client = s3_client()
    n = 0
    for rel in first:
        client.delete_object(Bucket=bucket, Key=f"{prefix}/{rel}")
        n += 1
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        keys += [o["Key"] for o in page.get("Contents", [])]
    for i in range(0, len(keys), DELETE_BATCH):
        batch = keys[i:i + DELETE_BATCH]
        resp = client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
        if resp.get("Errors"):
            err = resp["Errors"][0]
            raise ArtifactError(f"cannot delete s3://{bucket}/{err.get('Key')}: {err.get('Code')} {err.get('Message')}")
        n += len(batch)
    return n


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
