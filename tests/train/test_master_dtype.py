"""``lora.master_dtype: bfloat16`` reproduces the reference's bf16 masters (§12.1): LoRA tensors
and their AdamW state live in bf16, so at lr 1e-6 updates of A (|A| ≈ 1/r) round away while
B (starting at 0) learns."""
from __future__ import annotations

import torch

from .helpers import make_trainer

OVER = ["lora.master_dtype=bfloat16", "cold_start.generator.lr=1e-6", "cold_start.fake_score.lr=1e-6",
        "cold_start.total_steps=200", "cold_start.fake_update_ratio=1", "cold_start.global_batch_size=8",
        "cold_start.eval_interval=0", "cold_start.log_interval=50", "cold_start.checkpoint.save_interval=1000"]


def test_bf16_masters_keep_a_almost_fixed_while_b_learns(tmp_path):
    trainer = make_trainer("toy2d", tmp_path / "cs", OVER)
    trainer.setup()
    a0 = {k: v.detach().clone() for k, v in trainer.roles.lora_params("generator").items() if "lora_A" in k}
    assert all(v.dtype == torch.bfloat16 for v in trainer.roles.lora_params("generator").values())
    while trainer.step < 200:
        trainer.train_step()
        trainer.after_step()
        trainer.step += 1
    params = trainer.roles.lora_params("generator")
    changed = sum(int((params[k] != v).sum()) for k, v in a0.items())
    total = sum(v.numel() for v in a0.values())
    assert changed / total < 0.02, f"{changed}/{total} entries of A changed"
    assert any(float(p.abs().max()) > 0 for k, p in params.items() if "lora_B" in k), "B did not learn"
    state = trainer.optimizers["generator"].state
    assert state and all(s["exp_avg"].dtype == torch.bfloat16 for s in state.values())


def test_fp32_masters_move_a(tmp_path):
    trainer = make_trainer("toy2d", tmp_path / "cs", [o for o in OVER if "master_dtype" not in o]
                           + ["cold_start.total_steps=20"])
    trainer.setup()
    a0 = {k: v.detach().clone() for k, v in trainer.roles.lora_params("generator").items() if "lora_A" in k}
    while trainer.step < 20:
        trainer.train_step()
        trainer.after_step()
        trainer.step += 1
    params = trainer.roles.lora_params("generator")
    assert all(v.dtype == torch.float32 for v in params.values())
    changed = sum(int((params[k] != v).sum()) for k, v in a0.items())
    assert changed / sum(v.numel() for v in a0.values()) > 0.5


def test_warmup_formula_reference_starts_at_lr_zero():
    """optim warmup_formula: reference = min(1, k/warmup) (first step at lr 0); shifted = (k+1)/warmup."""
    from torch import nn

    from rtdmd.config.schema import OptimCfg
    from rtdmd.train.optim import RoleOptimizer

    params = {"w": nn.Parameter(torch.zeros(2))}
    ref = RoleOptimizer(params, OptimCfg(lr=1.0, warmup_steps=4))
    shifted = RoleOptimizer(params, OptimCfg(lr=1.0, warmup_steps=4, warmup_formula="shifted"))
    got_ref, got_shift = [], []
    for _ in range(5):
        got_ref.append(ref.lr)
        got_shift.append(shifted.lr)
        ref.scheduler.step()
        shifted.scheduler.step()
    assert got_ref == [0.0, 0.25, 0.5, 0.75, 1.0] and got_shift == [0.25, 0.5, 0.75, 1.0, 1.0]
