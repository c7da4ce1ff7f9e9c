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


def test_s3_publish_reads_the_source_in_place_and_replaces_its_old_manifest(tmp_path, s3):
    """Republishing a fetched artifact (it holds a manifest): the source is left as it was, the
    old manifest is neither uploaded as a file nor kept, and the new one lists exactly the files."""
    src = _src(tmp_path)
    write_manifest(src, {"stage": "cold_start"})
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    uri = "s3://art/runs/3/rl"
    manifest = publish_dir(src, uri, {"stage": "rl"})
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    assert set(manifest["files"]) == {"generator/w.bin", "notes.txt"}
    path = fetch_dir(uri, tmp_path / "cache")
    assert json.loads((path / "manifest.json").read_text()) == manifest
    assert verify_manifest(path)["stage"] == "rl"


def test_files_hashed_concurrently_match_one_by_one(tmp_path):
    from rtdmd.artifacts.fs import sha256_file, sha256_files

    paths = []
    for i in range(6):
        paths.append(tmp_path / f"f{i}.bin")
        paths[-1].write_bytes(bytes([i]) * (3 << 20) + b"tail" * i)
    assert sha256_files(paths) == [sha256_file(p) for p in paths]
    assert sha256_files(paths[:1]) == [sha256_file(paths[0])] and sha256_files([]) == []


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


@pytest.fixture
def recorded_s3(monkeypatch, tmp_path):
    """A moto S3 server that records every request it receives; yields a reader of them."""
    from rtdmd.testing.s3server import create_bucket, local_s3_server, recorded_requests, s3_env

    record = tmp_path / "requests.jsonl"
    with local_s3_server(record_to=record) as endpoint:
        for k, v in s3_env(endpoint).items():
            monkeypatch.setenv(k, v)
        create_bucket(endpoint, "art")
        yield lambda: recorded_requests(record)


def test_s3_fetch_of_unchanged_artifact_gets_no_payload(tmp_path, recorded_s3):
    uri, cache = "s3://art/runs/1/rl", tmp_path / "cache"
    src = _src(tmp_path)
    publish_dir(src, uri, {"stage": "rl"})
    fetch_dir(uri, cache)
    first = len(recorded_s3())
    path = fetch_dir(uri, cache)  # unchanged: only the manifest is read
    assert recorded_s3()[first:] == [("GET", "/art/runs/1/rl/manifest.json")]
    assert (path / "generator" / "w.bin").read_bytes() == b"x" * 1000
    # republished with one file changed: that file alone is downloaded, the other comes from the cache
    (src / "notes.txt").write_text("changed")
    publish_dir(src, uri, {"stage": "rl"})
    before = len(recorded_s3())
    path = fetch_dir(uri, cache)
    gets = [p for m, p in recorded_s3()[before:] if m == "GET"]
    assert gets == ["/art/runs/1/rl/manifest.json", "/art/runs/1/rl/notes.txt"]
    assert (path / "notes.txt").read_text() == "changed" and verify_manifest(path)["stage"] == "rl"
    # a cached file changed on disk is not trusted: it is fetched again
    (path / "generator" / "w.bin").write_bytes(b"z" * 1000)
    before = len(recorded_s3())
    path = fetch_dir(uri, cache)
    assert "/art/runs/1/rl/generator/w.bin" in [p for m, p in recorded_s3()[before:] if m == "GET"]
    assert (path / "generator" / "w.bin").read_bytes() == b"x" * 1000


def test_s3_delete_prefix_is_batched_and_marker_first(tmp_path, recorded_s3, monkeypatch):
    from rtdmd.artifacts import store

    src = _src(tmp_path)
    for i in range(3):
        (src / f"shard{i}.bin").write_bytes(bytes([i]) * 10)
    publish_dir(src, "s3://art/ckpt/step_000010", {"stage": "ckpt"})
    publish_dir(src, "s3://art/ckpt/step_000020", {"stage": "ckpt"})
    monkeypatch.setattr(store, "DELETE_BATCH", 2)
    before = len(recorded_s3())
    assert store.delete_prefix("s3://art/ckpt/step_000010", first=("manifest.json",)) == 6
    calls = recorded_s3()[before:]
    assert calls[0] == ("DELETE", "/art/ckpt/step_000010/manifest.json")  # the marker goes first
    assert [c for c in calls if c[0] == "POST"] == [("POST", "/art?delete")] * 3  # 5 keys, 2 per request
    assert not any(m == "DELETE" for m, _ in calls[1:])  # no object-by-object deletes
    assert not artifact_exists("s3://art/ckpt/step_000010") and artifact_exists("s3://art/ckpt/step_000020")
    assert fetch_dir("s3://art/ckpt/step_000020", tmp_path / "c")  # the neighbour prefix is untouched
