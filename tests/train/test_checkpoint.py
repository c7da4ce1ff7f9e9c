"""Checkpoint store (local and S3 via a loopback moto server): markers, keep_last, no pickle."""
from __future__ import annotations

import json

import pytest
import torch

from rtdmd.train.checkpoint import COMPLETE, CheckpointStore, load_optimizer_state, optimizer_state, rng_state, set_rng_state

from .helpers import make_trainer


def _save_three(store):
    for step in (10, 20, 30):
        store.save(step, {"a/x": torch.full((3,), float(step)), "b/step": torch.tensor(1.0)}, {"step": step})


def test_local_store_markers_keep_last_and_no_pickle(tmp_path):
    store = CheckpointStore(str(tmp_path / "ck"), keep_last=2)
    _save_three(store)
    assert store.complete_steps() == [20, 30]
    (tmp_path / "ck" / "step-40").mkdir()  # partial: no marker
    assert store.latest() == 30
    tensors, state = store.load(30)
    assert float(tensors["a/x"][0]) == 30.0 and state == {"step": 30}
    files = sorted(p.name for p in (tmp_path / "ck" / "step-30").iterdir())
    assert files == sorted([COMPLETE, "manifest.json", "state.json", "state.safetensors"])
    (tmp_path / "ck" / "step-30" / "state.json").write_text(json.dumps({"step": 31}))
    with pytest.raises(Exception, match="checksum"):
        store.load(30)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from rtdmd.testing.s3server import create_bucket, local_s3_server, s3_env

    with local_s3_server() as endpoint:
        create_bucket(endpoint, "ckpt")
        yield endpoint, s3_env(endpoint)


def test_s3_store(s3, monkeypatch):
    endpoint, env = s3
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import boto3

    store = CheckpointStore("s3://ckpt/run1", keep_last=2)
    calls = []
    boto3.setup_default_session()  # the session every s3_client() is built from: record its delete calls

    def record(model, params, **kw):
        if model.name in ("DeleteObject", "DeleteObjects"):
            calls.append((model.name, params.get("Key") or sorted(o["Key"] for o in params["Delete"]["Objects"])))

    for step in (10, 20):
        store.save(step, {"a/x": torch.full((3,), float(step)), "b/step": torch.tensor(1.0)}, {"step": step})
    boto3.DEFAULT_SESSION.events.register("before-parameter-build.s3", record)
    store.save(30, {"a/x": torch.full((3,), 30.0), "b/step": torch.tensor(1.0)}, {"step": 30})
    assert store.complete_steps() == [20, 30]
    # pruning step-10: its COMPLETE marker first (never a marker without its files), then one batch
    pruned = [c for c in calls if "step-10/" in str(c[1])]
    assert pruned == [("DeleteObject", "run1/step-10/COMPLETE"),
                      ("DeleteObjects", ["run1/step-10/manifest.json", "run1/step-10/state.json",
                                         "run1/step-10/state.safetensors"])]
    from rtdmd.artifacts.store import s3_client

    s3_client().put_object(Bucket="ckpt", Key="run1/step-50/state.json", Body=b"{}")  # partial upload
    assert store.latest() == 30
    tensors, state = store.load(30)
    assert float(tensors["a/x"][0]) == 30.0 and state["step"] == 30
    assert not [k for k in store._s3_keys() if k.startswith("step-10/")]


def test_training_resumes_from_s3_checkpoints(s3, monkeypatch, tmp_path):
    endpoint, env = s3
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ov = ["cold_start.global_batch_size=8", "cold_start.total_steps=4", "cold_start.eval_interval=0",
          "cold_start.checkpoint.save_interval=2", "cold_start.checkpoint.dir=s3://ckpt/toy"]
    first = make_trainer("toy2d", tmp_path, ov)
    first.opts.max_steps = 2
    first.run()
    assert CheckpointStore("s3://ckpt/toy").complete_steps() == [2]
    second = make_trainer("toy2d", tmp_path, ov)
    second.run()
    assert second.step == 4 and (tmp_path / "artifact" / "manifest.json").is_file()


def test_rng_and_optimizer_roundtrip():
    import random

    js, tens = rng_state()
    a = (random.random(), torch.rand(2))
    set_rng_state(json.loads(json.dumps(js)), tens)
    b = (random.random(), torch.rand(2))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    ojs, otens = optimizer_state(opt, ["w"])
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([q], lr=0.5)
    load_optimizer_state(opt2, {"w": q}, json.loads(json.dumps(ojs)), otens)
    for o in (opt, opt2):
        o.param_groups[0]["params"][0].grad = torch.ones(3, 2)
        o.step()
    assert torch.equal(p, q)
