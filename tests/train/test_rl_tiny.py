"""One RL epoch (= one generator and one fake-score optimizer step) on every tiny_* backbone, with
tiny differentiable CLIP-type rewards (clipscore + pickscore from the rewards' tiny checkpoints)
feeding both the advantages and reward back-propagation."""
from __future__ import annotations

import math
import re

import pytest
import torch

from rtdmd.config import load_params

from .helpers import TINY, write_prompts
from .rl_helpers import make_init_artifact, rl_trainer


@pytest.fixture(scope="module")
def reward_ckpts(tmp_path_factory):
    from rtdmd.rewards.tiny import build_tiny_reward_checkpoints

    return build_tiny_reward_checkpoints(tmp_path_factory.mktemp("reward_ckpts"), names=["clipscore", "pickscore"])


@pytest.mark.parametrize("name", TINY)
def test_one_rl_step_on_tiny_backbone(name, tmp_path, reward_ckpts, monkeypatch, capsys):
    monkeypatch.setenv("RTDMD_REWARD_CKPT_PATH", str(reward_ckpts))
    monkeypatch.setenv("RTDMD_PROGRESS_INTERVAL", "0.000001")  # the rollout bar shows up in the log at once
    from rtdmd.rewards import clear_scorer_cache

    clear_scorer_cache()
    prompts = write_prompts(tmp_path / "prompts" / "train.txt")
    over = [f"rl.prompts={prompts}", "model.resolution=32", "distributed.mixed_precision=fp32",
            "rl.num_images_per_prompt=2", "rl.global_sample_batch_size=4", "rl.num_batches_per_epoch=2",
            "rl.epochs=1", "rl.eval_interval=0", "rl.log_interval=1", "rl.fake_score_batch_size=4",
            "rl.reward_weights={clipscore: 1.0, pickscore: 1.0}", "rl.bp.grad_scale=0.01",
            "eval.num_prompts=2", "eval.batch_size=2"]
    if name == "tiny_flux2":
        over.append("model.text_encoder_out_layers=[1,2,3]")
    init = make_init_artifact(load_params(name, over), tmp_path / "cs", scale=0.01)
    trainer = rl_trainer(name, tmp_path / "rl", init, over)
    manifest = trainer.run()
    m = trainer.summary
    err = capsys.readouterr().err
    assert "rl rollout (epoch 0):" in err and re.search(r"rl: 100%\|#+\| 1/1 \[.*(step/s|s/step)", err), err[-2000:]
    assert all(math.isfinite(v) for v in m.values()), {k: v for k, v in m.items() if not math.isfinite(v)}
    for key in ("reward/clipscore", "reward/pickscore", "reward/mean", "adv/std", "ppo/clip_frac", "dm/loss",
                "bp/reward", "fake/loss_ac", "gen/grad_norm", "fake/grad_norm"):
        assert key in m, key
    assert m["grad_norm/bp"] > 0 and m["grad_norm/dm"] > 0 and m["grad_norm/ppo"] > 0
    assert m["gen/grad_norm"] > 0 and m["fake/grad_norm"] > 0
    # both fresh LoRAs moved (B starts at 0), the artifact stacks on the init artifact
    for role in ("generator", "fake_score"):
        state = trainer.roles.lora_state(role)
        assert any(float(v.abs().max()) > 0 for k, v in state.items() if "lora_B" in k), role
        assert all(torch.isfinite(v).all() for v in state.values())
    assert manifest["stage"] == "rl" and manifest["backbone"] == name and manifest["parent"]["uri"] == init
    assert manifest["rl"]["bp_rewards"] == {"clipscore": 1.0, "pickscore": 1.0}
