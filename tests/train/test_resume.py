"""Exact resume, partial checkpoints, keep_last and the config-hash guard (issue 3 §4)."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from rtdmd.lora.artifact import load_lora_artifact
from rtdmd.train.checkpoint import CheckpointError, CheckpointStore

from .helpers import ROOT, child_env, make_trainer, run, train_cmd

RESUME = ["distributed.strategy=none", "cold_start.global_batch_size=32", "cold_start.total_steps=200",
          "cold_start.fake_update_ratio=2", "cold_start.eval_interval=50", "cold_start.log_interval=10",
          "cold_start.checkpoint.save_interval=20", "cold_start.checkpoint.keep_last=2"]


def _final_state(out):
    store = CheckpointStore(str(out / "checkpoints"))
    step = store.latest()
    tensors = load_file(str(out / "checkpoints" / f"step-{step}" / "state.safetensors"))
    art = load_lora_artifact(str(out / "artifact"))
    return step, tensors, art


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    det = {"RTDMD_DETERMINISTIC": "1"}
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    res = run(train_cmd("toy2d", ref_out, *RESUME), **det)
    assert res.returncode == 0, res.stderr[-2000:]

    proc = subprocess.Popen(train_cmd("toy2d", out, *RESUME), cwd=ROOT, env=child_env(**det),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "checkpoints" / "step-20" / "COMPLETE"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists() and proc.returncode == -signal.SIGKILL
    assert not (out / "artifact").exists(), "the run was killed too late to test resume"
    killed_at = CheckpointStore(str(out / "checkpoints")).latest()
    assert killed_at is not None and killed_at < 200
    # leftovers of an interrupted save must be ignored: a dir without marker and a temp dir
    (out / "checkpoints" / "step-999").mkdir()
    (out / "checkpoints" / "step-999" / "state.json").write_text("{}")
    (out / "checkpoints" / ".step-1000.tmp-deadbeef").mkdir()

    res = run(train_cmd("toy2d", out, *RESUME), **det)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints'}/step-{killed_at}" in res.stderr

    step_a, ta, art_a = _final_state(ref_out)
    step_b, tb, art_b = _final_state(out)
    assert step_a == step_b == 200
    for key in [k for k in ta if k.startswith(("lora/", "ema/", "optim/"))]:
        assert torch.allclose(ta[key], tb[key], rtol=0, atol=1e-7), key
    for role in ("generator", "fake_score"):
        for k, v in art_a.adapters[role].state.items():
            assert torch.allclose(v, art_b.adapters[role].state[k], rtol=0, atol=1e-7), (role, k)
    # keep_last=2 among complete checkpoints; the marker-less dir is left alone, the temp dir removed
    assert CheckpointStore(str(out / "checkpoints")).complete_steps() == [180, 200]
    assert not (out / "checkpoints" / ".step-1000.tmp-deadbeef").exists()


def test_config_change_refused_unless_allowed(tmp_path):
    small = ["cold_start.global_batch_size=8", "cold_start.total_steps=4", "cold_start.eval_interval=0",
             "cold_start.checkpoint.save_interval=2"]
    make_trainer("toy2d", tmp_path, small).run()
    changed = small + ["cold_start.total_steps=6", "cold_start.generator.lr=0.002"]
    with pytest.raises(CheckpointError) as err:
        make_trainer("toy2d", tmp_path, changed).run()
    msg = str(err.value)
    assert "--allow-config-change" in msg and "cold_start.generator.lr" in msg and "step-4" in msg
    trainer = make_trainer("toy2d", tmp_path, changed)
    trainer.opts.allow_config_change = True
    trainer.run()
    assert trainer.step == 6


@pytest.mark.slow
def test_config_change_cli_exit_code(tmp_path):
    small = ["cold_start.global_batch_size=8", "cold_start.total_steps=2", "cold_start.eval_interval=0",
             "distributed.strategy=none"]
    assert run(train_cmd("toy2d", tmp_path, *small)).returncode == 0
    res = run(train_cmd("toy2d", tmp_path, *small, "cold_start.fake_score.lr=0.5"))
    assert res.returncode == 2 and "--allow-config-change" in res.stderr
    res = run(train_cmd("toy2d", tmp_path, *small, "cold_start.fake_score.lr=0.5", "--allow-config-change"))
    assert res.returncode == 0, res.stderr[-2000:]


def test_max_steps_stops_and_resumes_exactly(tmp_path):
    small = ["cold_start.global_batch_size=8", "cold_start.total_steps=6", "cold_start.eval_interval=3",
             "cold_start.checkpoint.save_interval=100", "cold_start.fake_update_ratio=2"]
    ref = make_trainer("toy2d", tmp_path / "ref", small)
    ref.run()
    part = make_trainer("toy2d", tmp_path / "part", small)
    part.opts.max_steps = 3
    assert part.run() is None and not (tmp_path / "part" / "artifact").exists()
    rest = make_trainer("toy2d", tmp_path / "part", small)
    rest.run()
    for role in ("generator", "fake_score"):
        a, b = ref.roles.lora_state(role), rest.roles.lora_state(role)
        assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-7) for k in a), role
