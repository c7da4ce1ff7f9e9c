"""Artifacts: manifests verify every file; publication is atomic locally and manifest-last on S3."""
import json

import pytest

from rtdmd.artifacts.fs import ArtifactError, atomic_dir, verify_manifest, write_manifest
from rtdmd.artifacts.store import artifact_exists, fetch_dir, publish_dir


def _src(tmp_path):
    src = tmp_path / "src"
    (src / "generator").mkdir(parents=True)
    (src / "generator" / "w.bin").write_bytes(b"x" * 1000)
    (src / "notes.txt").write_text("hello")
    return src


def test_manifest_detects_corruption_missing_and_extra_files(tmp_path):
    src = _src(tmp_path)
    write_manifest(src, {"stage": "test"})
    assert verify_manifest(src)["stage"] == "test"
    (src / "extra.txt").write_text("?")
    with pytest.raises(ArtifactError, match="not in the manifest: extra.txt"):
        verify_manifest(src)
    (src / "extra.txt").unlink()
    (src / "generator" / "w.bin").write_bytes(b"y" * 1000)
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        verify_manifest(src)
    (src / "notes.txt").unlink()
    with pytest.raises(ArtifactError, match="missing: notes.txt"):
        verify_manifest(src)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half").write_text("written")
            raise RuntimeError("crash mid-write")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_local_publish_and_fetch(tmp_path):
    manifest = publish_dir(_src(tmp_path), str(tmp_path / "root" / "run1" / "cold_start"), {"stage": "cold_start"})
    assert set(manifest["files"]) == {"generator/w.bin", "notes.txt"}
    path = fetch_dir(str(tmp_path / "root" / "run1" / "cold_start"))
    assert (path / "notes.txt").read_text() == "hello"
    with pytest.raises(ArtifactError, match="does not exist"):
        fetch_dir(str(tmp_path / "root" / "nope"))


@pytest.fixture
def s3(monkeypatch):
    from rtdmd.testing.s3server import local_s3_server

    with local_s3_server() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="art")
        yield endpoint


def test_s3_publish_fetch_round_trip(tmp_path, s3):
    uri = "s3://art/runs/1/cold_start"
    publish_dir(_src(tmp_path), uri, {"stage": "cold_start"})
    assert artifact_exists(uri)
    path = fetch_dir(uri, tmp_path / "cache")
    assert (path / "generator" / "w.bin").read_bytes() == b"x" * 1000
    assert json.loads((path / "manifest.json").read_text())["stage"] == "cold_start"


def test_s3_interrupted_upload_is_never_accepted(tmp_path, s3, monkeypatch):
    import boto3.s3.transfer  # noqa: F401
    from botocore.client import BaseClient

    uri = "s3://art/runs/2/rl"
    publish_dir(_src(tmp_path), uri, {"stage": "rl", "version": 1})  # a complete older artifact
    calls = {"n": 0}
    real = BaseClient._make_api_call

    def flaky(self, op, params):
        if op in ("PutObject", "UploadPart", "CreateMultipartUpload"):
            calls["n"] += 1
            if calls["n"] == 2:  # die after the first file of the new version
                raise ConnectionError("connection reset mid-artifact")
        return real(self, op, params)

    monkeypatch.setattr(BaseClient, "_make_api_call", flaky)
    src = _src(tmp_path / "v2")
    (src / "generator" / "w.bin").write_bytes(b"z" * 1000)
    with pytest.raises(Exception):
        publish_dir(src, uri, {"stage": "rl", "version": 2})
    monkeypatch.setattr(BaseClient, "_make_api_call", real)
    assert not artifact_exists(uri)
    with pytest.raises(ArtifactError, match="never completed"):
        fetch_dir(uri, tmp_path / "cache")
