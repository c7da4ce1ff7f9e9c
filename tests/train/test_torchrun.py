"""2-process ``torchrun`` (gloo, CPU) runs of tiny_flux2 with DDP and with FSDP2.

Each completes a few steps (critic + generator turns, EMA, a checkpoint, eval) and publishes a
LoRA artifact whose manifest verifies. DDP and FSDP implement the same math, so their artifacts
agree to float tolerance.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from rtdmd.artifacts.fs import verify_manifest
from rtdmd.lora.artifact import load_lora_artifact

from .helpers import run, tiny_overrides, train_cmd, write_prompts

pytestmark = pytest.mark.slow


def _train(tmp_path, strategy: str, extra=()):
    prompts = write_prompts(tmp_path / "prompts" / "train.txt")
    out = tmp_path / strategy
    ov = [*tiny_overrides("tiny_flux2", prompts), f"distributed.strategy={strategy}", "cold_start.total_steps=3",
          "cold_start.fake_update_ratio=2", "cold_start.log_interval=1", "cold_start.eval_interval=2",
          "cold_start.checkpoint.save_interval=2", *extra]
    res = run(train_cmd("tiny_flux2", out, *ov, nproc=2), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    fsdp_knobs = ["distributed.fsdp_sharding=hybrid_shard", "distributed.mixed_precision=bf16",
                  "distributed.gradient_checkpointing=true", "distributed.offload_frozen=true"]
    return {"ddp": _train(tmp, "ddp"), "fsdp": _train(tmp, "fsdp", fsdp_knobs)}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_ranks_produces_artifact(runs, strategy):
    out, res = runs[strategy]
    manifest = verify_manifest(out / "artifact")
    assert manifest["stage"] == "cold_start" and manifest["backbone"] == "tiny_flux2"
    assert manifest["world_size"] == 2 and manifest["steps"] == 3
    assert manifest["sampler"]["nfe"] == 4 and manifest["config_hash"]
    assert manifest["base_model"]["id"] == "data/tiny/tiny_flux2"
    art = load_lora_artifact(str(out / "artifact"), backbone="tiny_flux2")
    assert set(art.adapters) == {"generator", "fake_score"}
    assert all(torch.isfinite(v).all() for ad in art.adapters.values() for v in ad.state.values())
    assert (out / "checkpoints" / "step-2" / "COMPLETE").is_file()
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("generator/dmd" in r for r in rows) and any("eval/image_mean" in r for r in rows)
    assert not list(out.glob("rank*")), "only rank 0 writes"


def test_cpu_fallback_notes_are_logged_once(runs):
    err = runs["fsdp"][1].stderr
    for note in ("hybrid_shard on a single node", "mixed_precision=bf16 falls back to fp32",
                 "offload_frozen only applies to FSDP on GPU"):
        assert err.count(note) == 1, note  # rank 0 only


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_progress_bar_on_rank0_only(runs, strategy):
    lines = [ln for ln in runs[strategy][1].stderr.splitlines() if "cold_start:" in ln and "%|" in ln]
    done = [ln for ln in lines if "100%" in ln]
    assert len(done) == 1 and re.search(r" 3/3 \[.*(step/s|s/step)", done[0]), lines  # one bar: rank 0's
    assert sum("  0%|" in ln for ln in lines) == 1, lines


def test_ddp_and_fsdp_agree(runs):
    a = load_lora_artifact(str(runs["ddp"][0] / "artifact")).adapters
    b = load_lora_artifact(str(runs["fsdp"][0] / "artifact")).adapters
    for role in ("generator", "fake_score"):
        for k, v in a[role].state.items():
            assert torch.allclose(v, b[role].state[k], atol=1e-5, rtol=1e-4), (role, k)


def test_toy2d_ddp_fsdp_and_shard_grad_op_agree(tmp_path):
    """toy2d has LoRA on root-level layers (kept unsharded after forward by FSDP2) and eval swaps."""
    ov = ["cold_start.global_batch_size=8", "cold_start.total_steps=6", "cold_start.fake_update_ratio=2",
          "cold_start.eval_interval=3", "cold_start.log_interval=1", "cold_start.checkpoint.save_interval=3"]
    arts = {}
    for name, extra in {"ddp": ["distributed.strategy=ddp"], "fsdp": ["distributed.strategy=fsdp"],
                        "zero2": ["distributed.strategy=fsdp", "distributed.fsdp_sharding=shard_grad_op"]}.items():
        res = run(train_cmd("toy2d", tmp_path / name, *ov, *extra, nproc=2), timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        arts[name] = load_lora_artifact(str(tmp_path / name / "artifact")).adapters
    # resume under FSDP (sharded LoRA, optimizer moments and EMA re-distributed from the full state)
    zero2 = ["distributed.strategy=fsdp", "distributed.fsdp_sharding=shard_grad_op"]
    for args in (["--max-steps", "3"], []):
        res = run(train_cmd("toy2d", tmp_path / "resumed", *ov, *zero2, *args, nproc=2), timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr
    arts["resumed"] = load_lora_artifact(str(tmp_path / "resumed" / "artifact")).adapters
    for name in ("fsdp", "zero2", "resumed"):
        for role in ("generator", "fake_score"):
            for k, v in arts["ddp"][role].state.items():
                assert torch.allclose(v, arts[name][role].state[k], atol=1e-5, rtol=1e-4), (name, role, k)
    for role in ("generator", "fake_score"):
        for k, v in arts["zero2"][role].state.items():
            assert torch.equal(v, arts["resumed"][role].state[k]), (role, k)
