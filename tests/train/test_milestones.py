"""Milestone artifacts: the cold start publishes the state RL starts from (reference: step 15000),
and RL refuses an ``--init`` that is not that milestone."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from rtdmd.lora.artifact import load_lora_artifact
from rtdmd.lora.core import canonical_key

from .helpers import make_trainer, run
from .rl_helpers import write_toy_prompts

CS = ["cold_start.global_batch_size=8", "cold_start.total_steps=6", "cold_start.fake_update_ratio=2",
      "cold_start.eval_interval=0", "cold_start.log_interval=1", "cold_start.checkpoint.save_interval=5",
      "cold_start.checkpoint.keep_last=3", "cold_start.milestones=[3]"]


def test_milestone_artifact_equals_the_checkpoint_ema_at_that_step(tmp_path):
    out = tmp_path / "cs"
    trainer = make_trainer("toy2d", out, CS)
    trainer.run()
    ms = load_lora_artifact(str(out / "milestones" / "step-3"), backbone="toy2d")  # checksums verified
    assert ms.manifest["milestone"] == 3 and ms.manifest["steps"] == 3 and ms.manifest["stage"] == "cold_start"
    # a checkpoint is forced at the milestone; its EMA shadow is the milestone's generator
    ckpt = load_file(str(out / "checkpoints" / "step-3" / "state.safetensors"))
    ema = {canonical_key(k[len("ema/"):]): v for k, v in ckpt.items() if k.startswith("ema/")}
    gen = ms.adapters["generator"].state
    assert set(gen) == set(ema) and all(torch.equal(gen[k], ema[k].float()) for k in gen)
    fake = {canonical_key(k[len("lora/fake_score/"):]): v for k, v in ckpt.items() if k.startswith("lora/fake_score/")}
    assert all(torch.equal(ms.adapters["fake_score"].state[k], fake[k].float()) for k in fake)
    final = load_lora_artifact(str(out / "artifact"))
    assert final.manifest["steps"] == 6 and "milestone" not in final.manifest
    assert not torch.equal(final.adapters["generator"].state[next(iter(gen))], gen[next(iter(gen))])


def test_rl_starts_only_from_the_configured_milestone(tmp_path):
    out = tmp_path / "cs"
    make_trainer("toy2d", out, CS).run()
    prompts = write_toy_prompts(tmp_path / "prompts")
    rl = ["distributed.strategy=none", f"rl.prompts={prompts}", "rl.num_images_per_prompt=8",
          "rl.global_sample_batch_size=24", "rl.num_batches_per_epoch=1", "rl.epochs=1", "rl.eval_interval=0",
          "cold_start.milestones=[3]"]
    base = ["-m", "rtdmd.train", "rl", "--config", "toy2d", *rl]
    import sys

    wrong = run([sys.executable, *base, "rl.init_milestone=3", "--init", str(out / "artifact"),
                 "--out", str(tmp_path / "rl_bad")])
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "at step 6, but rl.init_milestone is 3" in wrong.stderr and "milestones/step-3" in wrong.stderr
    ok = run([sys.executable, *base, "rl.init_milestone=3", "--init", str(out / "milestones" / "step-3"),
              "--out", str(tmp_path / "rl")])
    assert ok.returncode == 0, ok.stderr[-2000:]
    art = load_lora_artifact(str(tmp_path / "rl" / "artifact"))
    assert art.manifest["parent"]["uri"] == str(out / "milestones" / "step-3")


def test_rl_evaluates_on_the_test_split_by_default(tmp_path):
    """rl.eval_split: test (the reference) reads the dataset's test split; a dataset without one is
    refused before any model loads; train evaluates on the training prompts."""
    import sys

    from rtdmd.config import load_params
    from rtdmd.train.rl_config import load_rl_prompts

    assert load_params("flux2_4b").rl.eval_split == "test"
    split = tmp_path / "split"
    split.mkdir()
    (split / "train.txt").write_text("a ring\n")
    (split / "test.txt").write_text("a square\n")
    assert load_rl_prompts(str(split), "test") == ["a square"] and load_rl_prompts(str(split), "train") == ["a ring"]
    out = tmp_path / "cs"
    make_trainer("toy2d", out, CS).run()
    prompts = write_toy_prompts(tmp_path / "prompts")  # train.txt only
    base = [sys.executable, "-m", "rtdmd.train", "rl", "--config", "toy2d", "distributed.strategy=none",
            f"rl.prompts={prompts}", "rl.num_images_per_prompt=8", "rl.global_sample_batch_size=24",
            "rl.num_batches_per_epoch=1", "rl.epochs=1", "rl.eval_interval=0", "--init", str(out / "artifact")]
    res = run([*base, "rl.eval_split=test", "--out", str(tmp_path / "rl")])
    assert res.returncode == 2 and "cannot read RL test prompts" in res.stderr and "rl.eval_split=train" in res.stderr
    assert not (tmp_path / "rl" / "checkpoints").exists()
