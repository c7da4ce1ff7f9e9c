"""Stage-1 randomness comes from streams derived from (seed, step[, rank]), as stage 2's does.

Values every rank must agree on (random stop, teacher CFG scale, τ, consistency δ) come from the
shared stream, so two ranks draw the same values without a broadcast; noise comes from the
rank's own stream; and a step re-draws the same values whatever the process RNG did before
(what exact resume relies on).
"""
from __future__ import annotations

import torch

from rtdmd.dist import DistEnv

from .helpers import make_trainer


def _trainer(tmp_path):
    prompts = tmp_path / "prompts" / "train.txt"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("ring\nsquare\ntriangle\n")
    t = make_trainer("toy2d", tmp_path / "out", [f"cold_start.prompts={prompts.parent}",
                                                 "cold_start.teacher_guidance=[1.0, 4.0]"])
    t.setup()
    return t


def _draws(t, step, rank=0):
    t.step = step
    t.env = DistEnv(rank=rank, world=2)  # only the rank enters the streams
    t.begin_step()
    s = torch.full((8,), 0.4)
    return (t.draw_stop(), t.draw_teacher_scale(), t.draw_tau(s), t._deltas(8)), t.randn((8, 2))


def test_shared_draws_agree_across_ranks_and_noise_does_not(tmp_path):
    r0 = _trainer(tmp_path)
    (shared0, noise0), (shared1, noise1) = _draws(r0, 5), _draws(r0, 5, rank=1)
    assert shared0[:2] == shared1[:2]
    assert torch.equal(shared0[2], shared1[2]) and torch.equal(shared0[3], shared1[3])
    assert not torch.equal(noise0, noise1)
    torch.manual_seed(1234)  # the process RNG does not matter
    again, noise_again = _draws(r0, 5)
    assert again[:2] == shared0[:2] and torch.equal(again[2], shared0[2]) and torch.equal(noise_again, noise0)
    other, _ = _draws(r0, 6)
    assert not torch.equal(other[2], shared0[2])
