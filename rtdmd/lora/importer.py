"""Import the published reference LoRA checkpoints into our artifact format.

``generator_ema.pt`` / ``fake_score_net.pt`` are torch-saved dicts of
``<module>.lora_A.default.weight`` (``[r, in]``) and ``…lora_B.default.weight`` (``[out, r]``)
tensors, rank 32 / alpha 64 in the released runs (spec §9). They are read with
``torch.load(weights_only=True)`` only; every adapted module must end with one of the backbone's
LoRA target names, so a checkpoint for another backbone is refused.

Validated before anything is written: every tensor finite; ``lora_A``/``lora_B`` form rank-r
pairs; when the backbone can be built here (tiny and toy backbones, or real weights present),
each module's ``(out, in)`` matches the backbone's Linear layer; ``alpha`` finite and in
``(0, MAX_ALPHA]``. An existing ``out`` that is not an imported artifact is never replaced
without ``force``; the output is locked while it is written (``rtdmd.artifacts.lock``).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable

from rtdmd.artifacts.fs import sha256_file
from rtdmd.artifacts.lock import OutputLock, check_replaceable
from rtdmd.lora.artifact import Adapter, publish_lora_artifact
from rtdmd.lora.core import LoraError, _target_matches, pairs, state_rank
from rtdmd.lora.io import read_reference_pt


def role_of(path: Path) -> str:
    name = path.name.lower()
    if "fake" in name:
        return "fake_score"
    return "generator"


MAX_ALPHA = 1e4


def check_alpha(alpha: float) -> float:
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0 < alpha <= MAX_ALPHA:
        raise LoraError(f"--alpha {alpha!r}: expected a finite number in (0, {MAX_ALPHA:g}] (reference: 64)")
    return float(alpha)


def check_finite(path: Path, state: dict) -> None:
    import torch

    for key, value in state.items():
        if not value.is_floating_point():
            raise LoraError(f"{path}: tensor '{key}' has dtype {value.dtype}; expected floating point")
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise LoraError(f"{path}: tensor '{key}' holds {bad} non-finite value(s) (NaN/Inf); refusing to import")


def backbone_shapes(params, warn: Callable[[str], None]) -> dict[str, tuple[int, int]] | None:
    """``{module: (out, in)}`` of the backbone's Linear layers, or ``None`` if it cannot be built here."""
    import torch.nn as nn

    from rtdmd.backbones import BackboneError, build_backbone

    try:
        net = build_backbone(params, "cpu").load_transformer("generator")
    except (BackboneError, OSError, ValueError) as exc:
        warn(f"note: shapes not checked against '{params.name}' (backbone not available here: {str(exc)[:160]})")
        return None
    return {n: (m.out_features, m.in_features) for n, m in net.named_modules() if isinstance(m, nn.Linear)}


def check_shapes(path: Path, state: dict, shapes: dict[str, tuple[int, int]]) -> None:
    for module, (a, b) in pairs(state).items():
        want = shapes.get(module)
        if want is None:
            raise LoraError(f"{path}: module '{module}' is not a Linear layer of this backbone: wrong --backbone?")
        if (b.shape[0], a.shape[1]) != want:
            raise LoraError(f"{path}: module '{module}' has lora_B {tuple(b.shape)} / lora_A {tuple(a.shape)}, i.e. "
                            f"(out, in) = {(b.shape[0], a.shape[1])}; the backbone's layer is {want}: wrong --backbone?")


def import_reference(paths: list[str | Path], *, params, out: str, alpha: float = 64.0, force: bool = False,
                     warn: Callable[[str], None] | None = None) -> dict:
    """Turn reference ``.pt`` files into one artifact at ``out``; returns its manifest."""
    warn = warn or (lambda m: print(m, file=sys.stderr))
    alpha = check_alpha(alpha)
    if "://" not in str(out):
        check_replaceable(out, force=force, ours=_is_imported, what="imported LoRA artifact")
    states = {Path(raw): read_reference_pt(Path(raw)) for raw in paths}
    for path, state in states.items():
        check_finite(path, state)
    shapes = backbone_shapes(params, warn)
    adapters: dict[str, Adapter] = {}
    sources = {}
    for path, state in states.items():
        if shapes is not None:
            check_shapes(path, state, shapes)
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
    if "://" in str(out):
        return _publish(out, adapters, params, sources)
    with OutputLock(out, command="rtdmd lora import"):
        return _publish(out, adapters, params, sources)


def _is_imported(path: Path) -> bool:
    import json

    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("kind") == "rtdmd-lora" and manifest.get("stage") == "imported"


def _publish(out: str, adapters: dict, params, sources: dict) -> dict:
    return publish_lora_artifact(out, adapters, {
        "stage": "imported", "backbone": params.name,
        "base_model": {"id": params.model.pretrained, "revision": params.model.revision,
                       "generator_init": params.model.generator_init},
        "sampler": {"step_list": params.sampler.step_list, "eta": params.sampler.eta,
                    "guidance": params.sampler.guidance},
        "sources": sources, "parent": None,
    })
