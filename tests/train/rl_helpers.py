"""Helpers for the stage-2 (RL) tests: synthetic init artifacts and engines."""
from __future__ import annotations

from pathlib import Path

import torch

TOY_PROMPTS = [f"{v} {c}" for c in ("ring", "square", "triangle") for v in ("a", "one more", "yet another")]


def write_toy_prompts(path: Path, prompts=TOY_PROMPTS) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "train.txt").write_text("\n".join(prompts) + "\n")
    return path


def make_init_artifact(params, out: Path, *, scale: float = 0.02, seed: int = 0, backbone_name: str | None = None,
                       roles=("generator", "fake_score")) -> str:
    """A small random LoRA artifact standing in for a cold-start output (no training needed)."""
    from rtdmd.backbones import build_backbone
    from rtdmd.lora import inject_lora, lora_parameters, lora_state_dict
    from rtdmd.lora.artifact import Adapter, publish_lora_artifact

    lc = params.lora
    bb = build_backbone(params)
    g = torch.Generator().manual_seed(seed)
    adapters = {}
    for role in roles:
        net = bb.load_transformer(role)
        inject_lora(net, list(lc.targets), lc.rank, lc.alpha)
        with torch.no_grad():
            for p in lora_parameters(net).values():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        adapters[role] = Adapter(lora_state_dict(net), lc.rank, lc.alpha, list(lc.targets))
    publish_lora_artifact(str(out), adapters, {"stage": "cold_start", "backbone": backbone_name or params.name,
                                               "parent": None})
    return str(out)


def rl_trainer(name: str, out: Path, init: str | None, overrides=(), logger=None):
    from rtdmd.config import load_params
    from rtdmd.train.base import RunOptions
    from rtdmd.train.logging import NullLogger
    from rtdmd.train.rl import RLTrainer

    params = load_params(name, ["distributed.strategy=none", *overrides])
    return RLTrainer(params, RunOptions(out=str(out), init=init), logger=logger or NullLogger())


def toy_nets(params, *, seed: int = 0):
    """Teacher + LoRA generator / fake score for toy2d (random small LoRA), plain AdamW."""
    from rtdmd.backbones import build_backbone
    from rtdmd.lora import inject_lora, lora_parameters
    from rtdmd.train.optim import RoleOptimizer
    from rtdmd.train.rl_core import RLNets

    bb = build_backbone(params)
    torch.manual_seed(seed)
    lc = params.lora
    nets = {}
    for role in ("generator", "fake_score"):
        net = bb.load_transformer(role)
        inject_lora(net, list(lc.targets), lc.rank, lc.alpha)
        nets[role] = net
    gp, fp = lora_parameters(nets["generator"]), lora_parameters(nets["fake_score"])
    rl = params.rl
    return bb, RLNets(teacher=bb.load_transformer("teacher"), generator=nets["generator"],
                      fake_score=nets["fake_score"], gen_params=gp, fake_params=fp,
                      gen_opt=RoleOptimizer(gp, rl.generator), fake_opt=RoleOptimizer(fp, rl.fake_score))
