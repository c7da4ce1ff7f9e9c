"""One critic turn and one generator turn of the AC-DMD stage on toy2d and every tiny backbone.

Checks (issue 3 acceptance): finite losses; the critic turn gives non-zero LoRA gradients on the
fake score only, the generator turn on the generator only; the other role's LoRA gets no (or
zero) gradient and no frozen weight (base layers, teacher) ever gets a gradient.
"""
from __future__ import annotations

import math

import pytest
import torch

from .helpers import TINY, make_trainer, tiny_overrides, write_prompts


def _zero(trainer):
    for opt in trainer.optimizers.values():
        opt.zero_grad(set_to_none=True)


def _nonzero(grads) -> bool:
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def _silent(grads) -> bool:
    return all(g is None or bool(g.abs().sum() == 0) for g in grads)


def _check_turn(trainer, metrics, trained: str, other: str):
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    roles = trainer.roles
    lora_t = [p.grad for p in roles.lora_params(trained).values()]
    lora_o = [p.grad for p in roles.lora_params(other).values()]
    assert _nonzero(lora_t), f"{trained} LoRA received no gradient"
    assert _silent(lora_o), f"{other} LoRA received a gradient"
    # frozen weights (the teacher, each base — one shared base or separate copies) never get one
    for net in roles.modules():
        for name, p in net.named_parameters():
            if ".lora_" not in name:
                assert p.grad is None and not p.requires_grad, f"frozen {name} received a gradient"


def _run_turns(trainer):
    trainer.setup()
    cond, uncond = trainer.conditioning()
    assert cond.batch_size == 2
    _zero(trainer)
    m = trainer.critic_turn(cond, uncond)
    assert "fake/ac" in m and "fake/consistency" in m
    _check_turn(trainer, m, "fake_score", "generator")
    _zero(trainer)
    m = trainer.generator_turn(cond, uncond)
    assert "generator/dmd" in m
    _check_turn(trainer, m, "generator", "fake_score")


@pytest.mark.parametrize("name", TINY)
def test_one_turn_each_tiny(name, tmp_path):
    prompts = write_prompts(tmp_path / "prompts" / "train.txt")
    trainer = make_trainer(name, tmp_path / "out", tiny_overrides(name, prompts))
    _run_turns(trainer)


def test_one_turn_each_toy2d(tmp_path):
    trainer = make_trainer("toy2d", tmp_path / "out", ["cold_start.global_batch_size=2"])
    _run_turns(trainer)


def test_plain_dmd_turns_toy2d(tmp_path):
    trainer = make_trainer("toy2d", tmp_path / "out", ["cold_start.global_batch_size=4", "ac_dmd.enabled=false"])
    trainer.setup()
    cond, uncond = trainer.conditioning()
    _zero(trainer)
    m = trainer.critic_turn(cond, uncond)
    assert "fake/fm" in m and "fake/ac" not in m
    _check_turn(trainer, m, "fake_score", "generator")
    _zero(trainer)
    _check_turn(trainer, trainer.generator_turn(cond, uncond), "generator", "fake_score")


def test_rollout_truncates_gradient_and_random_stop(tmp_path):
    trainer = make_trainer("toy2d", tmp_path / "out", ["cold_start.global_batch_size=4"])
    trainer.setup()
    cond, _ = trainer.conditioning()
    stops = set()
    for _ in range(40):
        last = trainer.rollout(cond, grad=True)
        stops.add(last.stop)
        assert not last.x_in.requires_grad and last.v.requires_grad and last.x_next.requires_grad
        assert last.sigma_n == trainer.sigmas[last.stop]
        if last.stop == len(trainer.sigmas) - 1:  # final step is deterministic: x_K = x̂0
            assert torch.allclose(last.x_next, last.x_in - last.sigma_c * last.v, atol=1e-6)
    assert stops == {1, 2, 3, 4}
