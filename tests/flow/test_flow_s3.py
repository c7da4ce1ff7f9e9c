"""The flow against an S3-compatible server on 127.0.0.1 (moto): Metaflow's S3 datastore *and* the
artifact root live on it, MLflow is an ``mlflow server`` (one worker) — the cluster set-up without
a cluster. Plus: an artifact upload killed mid-way is never accepted by a reader (nor by the flow)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rtdmd.testing.s3server import client, create_bucket, local_s3_server, s3_env

from .helpers import FLOW_NAME, ROOT, MlflowServer, assert_ok, flow_env, metaflow_run, mlflow_runs, run_flow, run_id_of

pytestmark = pytest.mark.slow

BUCKET = "rtdmd-flow"
TOY2D_S3 = ("cold_start.total_steps=150 cold_start.checkpoint.save_interval=50 cold_start.eval_interval=0 "
            "rl.epochs=8 rl.checkpoint.save_interval=4 rl.eval_interval=0 eval.num_prompts=3")


@pytest.fixture(scope="module")
def s3():
    with local_s3_server() as endpoint:
        create_bucket(endpoint, BUCKET)
        yield endpoint


@pytest.fixture(scope="module")
def mlflow_http(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow_server")) as url:
        yield url


def _keys(endpoint: str, prefix: str) -> list[str]:
    c, keys, token = client(endpoint), [], None
    while True:
        kw = {"Bucket": BUCKET, "Prefix": prefix}
        if token:
            kw["ContinuationToken"] = token
        resp = c.list_objects_v2(**kw)
        keys += [o["Key"] for o in resp.get("Contents", [])]
        if not resp.get("IsTruncated"):
            return keys
        token = resp["NextContinuationToken"]


def test_toy2d_full_flow_with_s3_datastore_and_artifacts(s3, mlflow_http, tmp_path, flow_base, monkeypatch):
    env = flow_env(tmp_path, **s3_env(s3), METAFLOW_DEFAULT_DATASTORE="s3",
                   METAFLOW_DATASTORE_SYSROOT_S3=f"s3://{BUCKET}/metaflow",
                   RTDMD_ARTIFACT_ROOT=f"s3://{BUCKET}/artifacts", MLFLOW_TRACKING_URI=mlflow_http)
    res = run_flow(["run", "--backbone", "toy2d", "--overrides", TOY2D_S3, "--max-workers", "2"], env,
                   top=["--datastore=s3"], timeout=1200, log=flow_base / "logs" / "toy2d_s3.log")
    assert_ok(res, "toy2d flow on S3")
    run_id = run_id_of(res.stdout + res.stderr)
    prefix = f"artifacts/{FLOW_NAME}/{run_id}/"
    keys = set(_keys(s3, prefix))
    for k in ("params.yaml", "prep/manifest.json", "cold_start/artifact/manifest.json", "rl/artifact/manifest.json",
              "eval/matrix/manifest.json", "eval/matrix/table.md", "eval/rtdmd-4/manifest.json"):
        assert prefix + k in keys, f"missing s3://{BUCKET}/{prefix}{k}"
    assert any(k.startswith(prefix + "rl/checkpoints/step-") and k.endswith("/COMPLETE") for k in keys)
    assert _keys(s3, f"metaflow/{FLOW_NAME}/"), "the Metaflow datastore must be on S3"
    assert not (tmp_path / "artifacts").exists(), "no artifact may be written to a local root"
    # locally only Metaflow's *metadata* (METAFLOW_DEFAULT_METADATA=local); no artifact blobs
    assert not (tmp_path / "mf" / ".metaflow" / FLOW_NAME / "data").exists(), "Metaflow artifacts written locally"

    # the consumer side: fetch + verify from S3, follow the stack to the cold start
    for k, v in s3_env(s3).items():
        monkeypatch.setenv(k, v)
    from rtdmd.lora.artifact import stack_chain

    chain = stack_chain(f"s3://{BUCKET}/{prefix}rl/artifact", backbone="toy2d", cache_dir=tmp_path / "cache2")
    assert [a.manifest["stage"] for a in chain] == ["cold_start", "rl"]

    info = metaflow_run(env, run_id)
    assert info["successful"]
    assert info["data"]["final"]["uri"] == f"s3://{BUCKET}/{prefix}rl/artifact"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_http)
    runs = [r for r in mlflow_runs(env, "rtdmd-toy2d") if r["tags"].get("rtdmd.logical_run_id") == run_id]
    kinds = sorted(r["tags"]["rtdmd.kind"] for r in runs)
    assert kinds == ["eval"] * 4 + ["flow"] + ["stage"] * 3, kinds
    rl = next(r for r in runs if r["tags"].get("rtdmd.stage") == "rl")
    assert rl["metrics"] and rl["tags"]["rtdmd.artifact_uri"].startswith("s3://")


PUBLISHER = r"""
import sys, tempfile
from pathlib import Path
from rtdmd.artifacts.store import publish_dir
src = Path(tempfile.mkdtemp())
(src / "generator").mkdir()
for i in range(400):
    (src / "generator" / f"shard-{i:04d}.bin").write_bytes(bytes([i % 251]) * 50_000)
print("ready", flush=True)
publish_dir(src, sys.argv[1], {"kind": "rtdmd-lora", "backbone": "toy2d", "stage": "cold_start"})
print("published", flush=True)
"""


def test_killed_upload_leaves_no_accepted_artifact(s3, tmp_path, flow_base, local_env, monkeypatch):
    """SIGKILL the uploading process mid-artifact: no reader (store, LoRA loader, the flow) accepts it."""
    uri = f"s3://{BUCKET}/artifacts/{FLOW_NAME}/killed/cold_start/artifact"
    env = {**os.environ, **s3_env(s3)}
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, uri], cwd=str(ROOT), env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.time() + 120
    prefix = f"artifacts/{FLOW_NAME}/killed/cold_start/artifact/"
    while time.time() < deadline and len(_keys(s3, prefix)) < 5:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    keys = _keys(s3, prefix)
    assert 5 <= len(keys) < 400, f"the kill must land mid-upload ({len(keys)} objects)"
    assert prefix + "manifest.json" not in keys

    for k, v in s3_env(s3).items():
        monkeypatch.setenv(k, v)
    from rtdmd.artifacts.fs import ArtifactError
    from rtdmd.artifacts.store import artifact_exists, fetch_dir
    from rtdmd.lora.artifact import load_lora_artifact
    from rtdmd.pipeline.training import verify_artifact

    assert not artifact_exists(uri)
    for reader in (lambda: fetch_dir(uri, tmp_path / "c1"), lambda: load_lora_artifact(uri, cache_dir=tmp_path / "c2"),
                   lambda: verify_artifact(uri)):
        with pytest.raises(ArtifactError, match="never completed"):
            reader()

    # the flow refuses it as an init artifact in start, before any training
    fenv = {**local_env, **s3_env(s3)}
    res = run_flow(["run", "--backbone", "toy2d", "--stages", "rl,eval", "--cold-start-uri", uri], fenv,
                   timeout=300, log=flow_base / "logs" / "killed_upload.log")
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert f"--cold-start-uri {uri} does not exist or is incomplete" in out
    assert "torch.distributed.run" not in out and "/rl/" not in out.split("Workflow starting")[-1].replace(uri, "")
