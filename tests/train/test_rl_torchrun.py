"""2-process ``torchrun`` (gloo, CPU) RL runs on toy2d with DDP-style gradient all-reduce and with
FSDP2: both complete, checkpoint, publish an artifact chained to the init artifact, and agree."""
from __future__ import annotations

import json

import pytest
import torch

from rtdmd.config import load_params
from rtdmd.lora.artifact import load_lora_artifact

from .helpers import VENV_BIN, free_port, run
from .rl_helpers import make_init_artifact, write_toy_prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rl_torchrun")
    prompts = write_toy_prompts(tmp / "prompts")
    over = [f"rl.prompts={prompts}", "rl.num_images_per_prompt=8", "rl.global_sample_batch_size=24", "rl.epochs=2",
            "rl.eval_interval=2", "rl.log_interval=1", "rl.checkpoint.save_interval=1"]
    init = make_init_artifact(load_params("toy2d", over), tmp / "cs")
    out = {}
    for strategy in ("ddp", "fsdp"):
        cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
               str(free_port()), "-m", "rtdmd.train", "rl", "--config", "toy2d", f"distributed.strategy={strategy}",
               *over, "--init", init, "--out", str(tmp / strategy)]
        res = run(cmd, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        out[strategy] = tmp / strategy
    return init, out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_rl_torchrun_two_ranks(runs, strategy):
    init, out = runs
    d = out[strategy]
    art = load_lora_artifact(str(d / "artifact"), backbone="toy2d")
    assert art.manifest["stage"] == "rl" and art.manifest["world_size"] == 2 and art.manifest["steps"] == 2
    assert art.manifest["parent"]["uri"] == init
    assert (d / "checkpoints" / "step-2" / "COMPLETE").is_file()
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert any("reward/mean" in r for r in rows) and any("eval/reward/mean" in r for r in rows)
    assert all(torch.isfinite(v).all() for ad in art.adapters.values() for v in ad.state.values())


def test_rl_ddp_and_fsdp_agree(runs):
    _, out = runs
    a = load_lora_artifact(str(out["ddp"] / "artifact")).adapters
    b = load_lora_artifact(str(out["fsdp"] / "artifact")).adapters
    for role in ("generator", "fake_score"):
        for k, v in a[role].state.items():
            assert torch.allclose(v, b[role].state[k], atol=1e-5), (role, k)
