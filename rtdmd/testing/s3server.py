"""A throw-away S3-compatible server on 127.0.0.1 for tests and local demos (moto's server mode).

    from rtdmd.testing.s3server import local_s3_server, s3_env, create_bucket

    with local_s3_server() as endpoint:              # "http://127.0.0.1:<free port>"
        create_bucket(endpoint, "rtdmd-test")
        env = {**os.environ, **s3_env(endpoint)}     # for a child process (dvc, metaflow, ...)
        subprocess.run([...], env=env, check=True)

The server is ``python -m moto.server`` (``moto[server]``, a dev dependency) started as a child
process on a free loopback port; the context manager waits until it answers HTTP and kills it on
exit (its own process only). State is in memory: every server starts empty.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator, Mapping

TEST_ACCESS_KEY = "rtdmd-test-key"
TEST_SECRET_KEY = "rtdmd-test-secret"
TEST_REGION = "us-east-1"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _answers(url: str, timeout: float = 1.0) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        opener.open(url + "/moto-api/", timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True  # any HTTP status means the server is up
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def local_s3_server(host: str = "127.0.0.1", port: int | None = None, timeout: float = 60.0,
                    attempts: int = 3, record_to: str | os.PathLike | None = None) -> Iterator[str]:
    """Start moto's S3 server, yield its endpoint URL, stop it afterwards.

    ``record_to``: moto's request recorder appends every request the server receives to this
    file (read it with :func:`recorded_requests`), e.g. to count GETs in a test."""
    last_err = ""
    for _ in range(attempts):
        p = port or free_port(host)
        env = {**os.environ, "MOTO_PORT": str(p)}
        if record_to is not None:
            env.update({"MOTO_ENABLE_RECORDING": "True", "MOTO_RECORDER_FILEPATH": str(record_to)})
        # moto logs every request to stderr: a file, never an undrained pipe (a full pipe blocks
        # the server's request threads on their log write and every client then hangs)
        errlog = tempfile.TemporaryFile()
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", host, "-p", str(p)],
            stdout=subprocess.DEVNULL, stderr=errlog, env=env,
        )
        url = f"http://{host}:{p}"
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    errlog.seek(0)
                    last_err = (errlog.read() or b"").decode(errors="replace")[-2000:]
                    break
                if _answers(url):
                    yield url
                    return
                time.sleep(0.2)
            else:
                raise TimeoutError(f"moto server on {url} did not answer within {timeout:.0f}s")
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            errlog.close()
        if port is not None:
            break
    raise RuntimeError(f"could not start moto server on {host}: {last_err}")


def recorded_requests(record_file: str | os.PathLike) -> list[tuple[str, str]]:
    """``(method, path?query)`` of every request recorded by ``local_s3_server(record_to=...)``,
    in arrival order (the server's own health probes on ``/moto-api/`` and ``/`` left out)."""
    import json
    from urllib.parse import urlsplit

    out = []
    if not os.path.exists(record_file):
        return out
    with open(record_file) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                url = urlsplit(rec.get("url", ""))
                path = url.path + (f"?{url.query}" if url.query else "")
                if path not in ("/", "/moto-api/"):
                    out.append((rec.get("method", ""), path))
    return out


def s3_env(endpoint: str, *, access_key: str = TEST_ACCESS_KEY, secret_key: str = TEST_SECRET_KEY,
           region: str = TEST_REGION) -> dict[str, str]:
    """AWS_* variables that point boto3 / s3fs (DVC) / Metaflow clients at ``endpoint``.

    Merge into a child's environment: ``{**os.environ, **s3_env(url)}``. Loopback is added to
    ``NO_PROXY`` so a configured HTTP proxy is bypassed.
    """
    no_proxy = ",".join(x for x in (os.environ.get("NO_PROXY", ""), "127.0.0.1,localhost") if x)
    return {
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "METAFLOW_S3_ENDPOINT_URL": endpoint,
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


@contextlib.contextmanager
def patched_env(values: Mapping[str, str]) -> Iterator[None]:
    """Temporarily set environment variables in this process (restored afterwards)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def client(endpoint: str, **env_overrides):
    """A boto3 S3 client for ``endpoint`` with the test credentials: the project's one factory
    (:func:`rtdmd.artifacts.store.s3_client`) built under :func:`s3_env` (boto3 reads the
    endpoint and credentials when the client is created)."""
    from rtdmd.artifacts.store import s3_client

    with patched_env(s3_env(endpoint, **env_overrides)):
        return s3_client()


def create_bucket(endpoint: str, bucket: str) -> None:
    """Create ``bucket`` (idempotent)."""
    c = client(endpoint)
    existing = {b["Name"] for b in c.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        c.create_bucket(Bucket=bucket)


def upload_tree(endpoint: str, bucket: str, prefix: str, local_dir: str | os.PathLike) -> list[str]:
    """Upload every file under ``local_dir`` to ``s3://bucket/prefix/<relative path>``."""
    from pathlib import Path

    c = client(endpoint)
    keys = []
    root = Path(local_dir)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        key = f"{prefix.strip('/')}/{f.relative_to(root).as_posix()}".lstrip("/")
        c.upload_file(str(f), bucket, key)
        keys.append(key)
    return keys
