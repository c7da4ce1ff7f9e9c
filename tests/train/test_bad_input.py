"""Bad input: non-finite losses, missing teacher weights, out-of-range knobs, world size."""
from __future__ import annotations

import pytest
import torch

from rtdmd.backbones.base import BackboneError
from rtdmd.config import ConfigError, load_params
from rtdmd.train.base import NonFiniteLossError
from rtdmd.train.checkpoint import CheckpointStore
from rtdmd.train.cold_start import ColdStartTrainer

from .helpers import make_trainer, run, train_cmd

SMALL = ["cold_start.global_batch_size=8", "cold_start.total_steps=8", "cold_start.fake_update_ratio=2",
         "cold_start.checkpoint.save_interval=2", "cold_start.eval_interval=0"]


def _nan_trainer(role: str, at_step: int):
    class NaNAt(ColdStartTrainer):
        def velocity(self, r, x, sigma, cond):
            v = super().velocity(r, x, sigma, cond)
            if r == role and self.step == at_step and torch.is_grad_enabled():
                return v * float("nan")
            return v
    return NaNAt


@pytest.mark.parametrize("role,term", [("fake_score", "fake/ac"), ("generator", "generator/dmd")])
def test_non_finite_loss_stops_with_step_and_term(role, term, tmp_path):
    trainer = make_trainer("toy2d", tmp_path, SMALL, cls=_nan_trainer(role, 5))
    with pytest.raises(NonFiniteLossError) as err:
        trainer.run()
    msg = str(err.value)
    assert "step 5" in msg and f"'{term}'" in msg and "nan" in msg
    store = CheckpointStore(str(tmp_path / "checkpoints"))
    assert store.complete_steps() == [2, 4]  # the last good checkpoint is kept, nothing written after
    assert not (tmp_path / "artifact").exists()


def test_missing_teacher_weights(tmp_path):
    trainer = make_trainer("toy2d", tmp_path, ["model.tiny=false", f"model.pretrained={tmp_path / 'nowhere'}"])
    with pytest.raises(BackboneError, match="teacher weights not found"):
        trainer.setup()


def test_missing_teacher_weights_cli_one_line_error(tmp_path):
    res = run(train_cmd("toy2d", tmp_path / "out", "model.tiny=false", f"model.pretrained={tmp_path / 'nowhere'}"),
              timeout=300)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "BackboneError" in lines[0] and "teacher weights not found" in lines[0]


@pytest.mark.parametrize("override,needle", [
    ("sampler.eta=1.5", "sampler.eta"),
    ("sampler.eta=-0.1", "sampler.eta"),
    ("dmd.min_step=980", "min_step"),  # == max_step
    ("dmd.min_step=990", "min_step"),
    ("cold_start.fake_update_ratio=0", "fake_update_ratio"),
    ("cold_start.fake_update_ratio=-3", "fake_update_ratio"),
])
def test_out_of_range_knobs_rejected_at_load(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_params("toy2d", [override])


def test_world_size_checked_before_models(monkeypatch):
    from rtdmd import dist as D

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        D.init_distributed(load_params("toy2d"), "cold_start")


def test_missing_prompts_is_a_config_error(tmp_path):
    trainer = make_trainer("toy2d", tmp_path, [f"cold_start.prompts={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match="does not exist"):
        trainer.setup()
