"""Trainers set up in-process for the benchmarks (the real classes, the real ``setup()``).

* :func:`cold_start_trainer` — :class:`rtdmd.train.cold_start.ColdStartTrainer`;
* :func:`rl_trainer` — :class:`rtdmd.train.rl.RLTrainer` from a random-LoRA init artifact (an
  RL stage needs ``--init``; the values of the init LoRA do not change the cost of a step).

Benchmark overrides on top of ``params/<name>.yaml``: ``distributed.strategy=none`` (one
process), ``log_interval`` huge (log steps add per-term gradient norms = extra backward passes,
which a production run does every few hundred steps only), evaluation off, and for the cold start
``random_stop=false`` (every rollout runs all K steps, so every step does the same work and the
median is meaningful).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

BENCH_OVERRIDES = ["distributed.strategy=none"]
CS_OVERRIDES = ["cold_start.random_stop=false", "cold_start.log_interval=1000000", "cold_start.eval_interval=0",
                "cold_start.checkpoint.save_interval=1000000"]
RL_OVERRIDES = ["rl.log_interval=1000000", "rl.eval_interval=0", "rl.checkpoint.save_interval=1000000",
                "rl.epochs=1000000"]


def load(name: str, overrides: Sequence[str]):
    from rtdmd.config import load_params

    return load_params(name, [*BENCH_OVERRIDES, *overrides])


def cold_start_trainer(name: str, out: Path, overrides: Sequence[str] = ()):
    from rtdmd.train.base import RunOptions
    from rtdmd.train.cold_start import ColdStartTrainer
    from rtdmd.train.logging import NullLogger

    params = load(name, [*CS_OVERRIDES, *overrides])
    tr = ColdStartTrainer(params, RunOptions(out=str(out)), logger=NullLogger())
    tr.setup()
    return tr


def random_init_artifact(params, out: Path, scale: float = 0.01, seed: int = 0) -> str:
    """A cold-start-shaped LoRA artifact with small random weights (stands in for stage 1)."""
    from rtdmd.backbones import build_backbone
    from rtdmd.lora import inject_lora, lora_parameters, lora_state_dict
    from rtdmd.lora.artifact import Adapter, publish_lora_artifact

    if (out / "manifest.json").is_file():
        return str(out)
    lc = params.lora
    bb = build_backbone(params)
    g = torch.Generator().manual_seed(seed)
    adapters = {}
    for role in ("generator", "fake_score"):
        net = bb.load_transformer(role)
        inject_lora(net, list(lc.targets), lc.rank, lc.alpha)
        with torch.no_grad():
            for p in lora_parameters(net).values():
                p.copy_(scale * torch.randn(p.shape, generator=g))
        adapters[role] = Adapter(lora_state_dict(net), lc.rank, lc.alpha, list(lc.targets))
    publish_lora_artifact(str(out), adapters, {"stage": "cold_start", "backbone": params.name, "parent": None})
    return str(out)


def reward_ckpts(workdir: Path) -> Path:
    """Tiny clipscore + pickscore checkpoints (the RL rewards of ``params/tiny_flux2.yaml``)."""
    from rtdmd.rewards.tiny import build_tiny_reward_checkpoints

    d = workdir / "reward_ckpts"
    if not (d / ".done").is_file():
        build_tiny_reward_checkpoints(d, names=["clipscore", "pickscore"])
        (d / ".done").write_text("ok")
    return d


def rl_trainer(name: str, out: Path, workdir: Path, overrides: Sequence[str] = ()):
    import os

    from rtdmd.train.base import RunOptions
    from rtdmd.train.logging import NullLogger
    from rtdmd.train.rl import RLTrainer

    params = load(name, [*RL_OVERRIDES, *overrides])
    if params.model.family != "toy2d":
        os.environ["RTDMD_REWARD_CKPT_PATH"] = str(reward_ckpts(workdir))
        from rtdmd.rewards import clear_scorer_cache

        clear_scorer_cache()
    import hashlib

    tag = hashlib.sha1(repr(list(overrides)).encode()).hexdigest()[:10]
    init = random_init_artifact(params, workdir / f"init_{name}_{tag}")
    tr = RLTrainer(params, RunOptions(out=str(out), init=init), logger=NullLogger())
    tr.setup()
    return tr


def loop_step(tr) -> None:
    """One iteration exactly as ``Trainer.run`` does it (without logging/eval/checkpoint):
    ``train_step()``, ``roles.reshard()`` (where the trainer has it), ``after_step()``, step + 1."""
    tr.train_step()
    reshard = getattr(tr.roles, "reshard", None)
    if reshard is not None:
        reshard()
    tr.after_step()
    tr.step += 1
