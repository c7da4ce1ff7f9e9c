"""Exact resume of the RL stage on toy2d: SIGKILL after a checkpoint, re-run the same command,
final LoRA / EMA / optimizer state, stat tracker and sampler position equal an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from rtdmd.config import load_params
from rtdmd.lora.artifact import load_lora_artifact
from rtdmd.train.checkpoint import CheckpointStore

from .helpers import ROOT, child_env, run
from .rl_helpers import make_init_artifact, write_toy_prompts

pytestmark = pytest.mark.slow


def _cmd(out, init, overrides):
    return [sys.executable, "-m", "rtdmd.train", "rl", "--config", "toy2d", *overrides, "--init", init,
            "--out", str(out)]


def _final(out):
    step = CheckpointStore(str(out / "checkpoints")).latest()
    d = out / "checkpoints" / f"step-{step}"
    return step, load_file(str(d / "state.safetensors")), json.loads((d / "state.json").read_text())


def test_rl_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    prompts = write_toy_prompts(tmp_path / "prompts")
    over = ["distributed.strategy=none", f"rl.prompts={prompts}", "rl.num_images_per_prompt=8",
            "rl.global_sample_batch_size=24", "rl.num_batches_per_epoch=2", "rl.epochs=20", "rl.eval_interval=5",
            "rl.log_interval=2", "rl.checkpoint.save_interval=4", "rl.checkpoint.keep_last=2", "rl.ema_interval=3"]
    init = make_init_artifact(load_params("toy2d", over), tmp_path / "cs")
    det = {"RTDMD_DETERMINISTIC": "1"}
    ref, out = tmp_path / "ref", tmp_path / "killed"
    res = run(_cmd(ref, init, over), **det)
    assert res.returncode == 0, res.stderr[-3000:]

    proc = subprocess.Popen(_cmd(out, init, over), cwd=ROOT, env=child_env(**det),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "checkpoints" / "step-4" / "COMPLETE"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists() and proc.returncode == -signal.SIGKILL
    assert not (out / "artifact").exists(), "the run was killed too late to test resume"
    killed_at = CheckpointStore(str(out / "checkpoints")).latest()
    assert killed_at is not None and killed_at < 20

    res = run(_cmd(out, init, over), **det)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints'}/step-{killed_at}" in res.stderr

    step_a, ta, ja = _final(ref)
    step_b, tb, jb = _final(out)
    assert step_a == step_b == 20
    keys = [k for k in ta if k.startswith(("lora/", "ema/", "optim/"))]
    assert any(k.startswith("ema/") for k in keys) and any(k.startswith("optim/generator") for k in keys)
    for key in keys:
        assert torch.allclose(ta[key], tb[key], rtol=0, atol=1e-7), key
    # stat tracker (per-prompt reward history of the last epoch), sampler position, counters, EMA counters
    assert ja["extra"] == jb["extra"] and ja["data"] == jb["data"] and ja["ema"] == jb["ema"]
    assert ja["data"]["epoch"] == 20 and ja["extra"]["engine"]["global_step"] == 20
    assert ja["extra"]["engine"]["stat_tracker"]["stats"], "the tracker state is part of the checkpoint"
    art_a, art_b = load_lora_artifact(str(ref / "artifact")), load_lora_artifact(str(out / "artifact"))
    for role in ("generator", "fake_score"):
        for k, v in art_a.adapters[role].state.items():
            assert torch.allclose(v, art_b.adapters[role].state[k], rtol=0, atol=1e-7), (role, k)
    assert art_a.manifest["parent"] == art_b.manifest["parent"]


def test_rl_cli_non_differentiable_bp_reward_exits_2(tmp_path):
    prompts = write_toy_prompts(tmp_path / "prompts")
    over = ["distributed.strategy=none", f"rl.prompts={prompts}"]
    init = make_init_artifact(load_params("toy2d", over), tmp_path / "cs")
    res = run(_cmd(tmp_path / "a", init, [*over, "rl.bp.rewards={toy2d_region: 1.0}"]))
    assert res.returncode == 2 and "not differentiable" in res.stderr, res.stderr[-2000:]
