"""Import the published reference LoRA checkpoints into our artifact format.

``generator_ema.pt`` / ``fake_score_net.pt`` are torch-saved dicts of
``<module>.lora_A.default.weight`` (``[r, in]``) and ``…lora_B.default.weight`` (``[out, r]``)
tensors, rank 32 / alpha 64 in the released runs (spec §9). They are read with
``torch.load(weights_only=True)`` only; every adapted module must end with one of the backbone's
LoRA target names, so a checkpoint for another backbone is refused.
"""
from __future__ import annotations

from pathlib import Path

from rtdmd.artifacts.fs import sha256_file
from rtdmd.lora.artifact import Adapter, publish_lora_artifact
from rtdmd.lora.core import LoraError, _target_matches, pairs, state_rank
from rtdmd.lora.io import read_reference_pt


def role_of(path: Path) -> str:
    name = path.name.lower()
    if "fake" in name:
        return "fake_score"
    return "generator"


def import_reference(paths: list[str | Path], *, params, out: str, alpha: float = 64.0) -> dict:
    """Turn reference ``.pt`` files into one artifact at ``out``; returns its manifest."""
    adapters: dict[str, Adapter] = {}
    sources = {}
    for raw in paths:
        path = Path(raw)
        state = read_reference_pt(path)
        modules = list(pairs(state))
        stray = [m for m in modules if not any(_target_matches(m, t) for t in params.lora.targets)]
        if stray:
            raise LoraError(
                f"{path}: modules {stray[:3]} match none of the '{params.name}' LoRA targets "
                f"({', '.join(params.lora.targets[:6])}…): wrong --backbone?"
            )
        role = role_of(path)
        if role in adapters:
            raise LoraError(f"two files map to the role '{role}': pass one generator and at most one fake-score file")
        adapters[role] = Adapter(state, state_rank(state), alpha, list(params.lora.targets))
        sources[role] = {"file": path.name, "sha256": sha256_file(path)}
    if "generator" not in adapters:
        raise LoraError("no generator checkpoint given (expected e.g. generator_ema.pt)")
    return publish_lora_artifact(out, adapters, {
        "stage": "imported", "backbone": params.name,
        "base_model": {"id": params.model.pretrained, "revision": params.model.revision,
                       "generator_init": params.model.generator_init},
        "sampler": {"step_list": params.sampler.step_list, "eta": params.sampler.eta,
                    "guidance": params.sampler.guidance},
        "sources": sources, "parent": None,
    })
