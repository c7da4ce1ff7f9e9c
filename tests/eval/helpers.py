"""Helpers shared by the evaluation tests (tiny params, LoRA artifact chains, prompt lists)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from rtdmd.config import load_params

DRAWBENCH = ["a red cube on a table", "a cat wearing a hat", "a blue bicycle", "a bowl of fruit",
             "a castle at night", "a small boat"]
GENERAL = ["a dog in the snow", "a green apple", "a tall tower"]



def flux_params(*overrides: str):
    """tiny_flux2 params; the tiny Qwen3 has 3 layers, so pin the output layers if the YAML does not."""
    p = load_params("tiny_flux2", list(overrides))
    if p.model.text_encoder_out_layers is None:
        p = load_params("tiny_flux2", ["model.text_encoder_out_layers=[1,2,3]", *overrides])
    return p


def make_lora_chain(params, out: Path, scale: float = 0.05, seed: int = 0) -> tuple[Path, Path]:
    """A cold-start artifact and an RL artifact whose manifest names it as parent."""
    from rtdmd.backbones import build_backbone
    from rtdmd.lora import inject_lora, lora_state_dict
    from rtdmd.lora.artifact import Adapter, publish_lora_artifact

    net = build_backbone(params).load_transformer("generator")
    inject_lora(net, params.lora.targets, params.lora.rank, params.lora.alpha)
    g = torch.Generator().manual_seed(seed)
    paths = []
    parent = None
    for stage in ("cold_start", "rl"):
        with torch.no_grad():
            for n, p in net.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
        uri = out / stage
        publish_lora_artifact(str(uri), {"generator": Adapter(lora_state_dict(net), params.lora.rank,
                                                              params.lora.alpha, list(params.lora.targets))},
                              {"stage": stage, "backbone": params.name, "parent": parent})
        parent = {"uri": str(uri), "manifest_sha256": hashlib.sha256((uri / "manifest.json").read_bytes()).hexdigest()}
        paths.append(uri)
    return paths[0], paths[1]
