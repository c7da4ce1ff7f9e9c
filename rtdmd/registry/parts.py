"""The parts of a registered RTDMD model, shared by :func:`rtdmd.registry.load_registered` and the
MLflow pyfunc model (:mod:`rtdmd.registry.pyfunc`): the sampler settings, a resolved (fetched and
verified) version, and the ready pipeline (backbone + generator with the LoRA stack merged).

A version's RTDMD files (``rtdmd_model.json``, ``params.yaml``, ``stack/NN-<stage>/``; see
:mod:`rtdmd.registry.register`) are checked by :func:`verify_version_dir` and turned into parts by
:func:`resolve_local` + :func:`build_pipeline`; neither touches the registry.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rtdmd.artifacts.fs import ArtifactError, verify_manifest
from rtdmd.config import load_params
from rtdmd.registry.client import ModelRef
from rtdmd.registry.constants import FORMAT, MODEL_FILE
from rtdmd.registry.errors import RegistryError


@dataclass
class SamplerSettings:
    step_list: list[float]
    eta: float
    guidance: float

    @property
    def nfe(self) -> int:
        return len(self.step_list)

    def to_dict(self) -> dict:
        return {"nfe": self.nfe, "step_list": list(self.step_list), "eta": self.eta, "guidance": self.guidance}


@dataclass
class ResolvedModel:
    """Everything needed to build the model, fetched and verified; no network built yet."""

    ref: ModelRef
    params: Any  # rtdmd.config.Params (sampler set to the registered settings)
    stack_dirs: list[str]  # local LoRA artifact directories, merge order
    sampler: SamplerSettings
    info: dict  # rtdmd_model.json (artifact refs: derived from the manifests)
    name: str | None = None
    version: str | None = None
    aliases: list[str] = field(default_factory=list)
    local_dir: Path | None = None
    evaluation: dict | None = None
    model_dir: Path | None = None  # the local MLflow pyfunc model (None: an artifact, or loose files)

    @property
    def label(self) -> str:
        if self.name:
            return f"{self.name} v{self.version}" + (f" ({', '.join(self.aliases)})" if self.aliases else "")
        return self.ref.text

    def variant_spec(self, name: str) -> str:
        """An evaluation-matrix variant (``rtdmd.eval.variants`` syntax) for this model."""
        steps = "/".join(f"{float(s):g}" for s in self.sampler.step_list)
        uris = ",".join(self.stack_dirs)
        return (f"{name}=lora:{uris},chain=false,step_list={steps},eta={self.sampler.eta!r},"
                f"guidance={self.sampler.guidance!r}")


def verify_version_dir(root: Path) -> dict:
    """Check ``rtdmd_model.json`` and every stack artifact's files (against its manifest, and the
    manifest against the sha256 recorded at registration); returns the info dict."""

    mf = root / MODEL_FILE
    if not mf.is_file():
        raise RegistryError(f"{root} has no {MODEL_FILE}: not a registered RTDMD model")
    info = json.loads(mf.read_text())
    if info.get("format") != FORMAT:
        raise RegistryError(f"{mf}: unsupported format {info.get('format')!r} (expected {FORMAT})")
    for entry in info["stack"]:
        d = root / entry["dir"]
        try:
            verify_manifest(d)
        except ArtifactError as exc:
            raise RegistryError(f"registered files are corrupt: {exc}") from None
        got = hashlib.sha256((d / "manifest.json").read_bytes()).hexdigest()
        if got != entry["manifest_sha256"]:
            raise RegistryError(f"{d}: manifest sha256 {got[:12]}… != registered {entry['manifest_sha256'][:12]}…")
    return info


def apply_sampler(params, s: SamplerSettings):
    params.sampler.step_list = [int(x) if float(x).is_integer() else x for x in s.step_list]
    params.sampler.eta = float(s.eta)
    params.sampler.guidance = float(s.guidance)
    return params


def resolve_local(root: Path, ref: ModelRef, *, overrides: Sequence[str] = (), info: dict | None = None) -> ResolvedModel:
    """A verified version directory -> :class:`ResolvedModel` (registered params + sampler settings)."""
    info = info if info is not None else verify_version_dir(root)
    params = load_params(root / "params.yaml", list(overrides))
    sm = info["sampler"]
    sampler = SamplerSettings([float(s) for s in sm.get("step_list") or params.sampler.step_list],
                              float(sm.get("eta", params.sampler.eta)), float(sm.get("guidance", params.sampler.guidance)))
    return ResolvedModel(ref=ref, params=apply_sampler(params, sampler),
                         stack_dirs=[str(root / e["dir"]) for e in info["stack"]], sampler=sampler, info=info,
                         local_dir=root)


@dataclass
class RegisteredPipeline:
    """Ready pipeline parts: backbone + generator (LoRA stack merged) + sampler settings."""

    resolved: ResolvedModel
    backbone: Any  # rtdmd.backbones.Backbone
    generator: Any  # torch.nn.Module, eval mode, no grad
    stack: list  # rtdmd.lora.artifact.LoraArtifact, merge order
    pyfunc: Any = None  # the mlflow.pyfunc.PyFuncModel this was loaded through (None: an artifact / old version)

    @property
    def params(self):
        return self.resolved.params

    @property
    def sampler(self) -> SamplerSettings:
        return self.resolved.sampler

    @property
    def version(self) -> str | None:
        return self.resolved.version

    def generate(self, prompts: Sequence[str], *, seed: int | Sequence[int] = 0, step_list: Sequence[float] | None = None,
                 eta: float | None = None, guidance: float | None = None):
        """Samples for ``prompts`` (images in [0, 1] ``[N,3,H,W]``; toy2d: points ``[N,2]``).

        An int ``seed`` gives sample ``i`` the seed ``seed + i`` (as ``rtdmd.infer`` / the
        evaluation matrix do), so a sample does not depend on the batch it is in.
        """
        from rtdmd.sampling import generate  # lazy: torch

        seeds = [int(seed) + i for i in range(len(prompts))] if isinstance(seed, int) else [int(s) for s in seed]
        g = float(self.sampler.guidance if guidance is None else guidance)
        return generate(self.backbone, self.generator, list(prompts),
                        step_list=list(self.sampler.step_list if step_list is None else step_list),
                        eta=float(self.sampler.eta if eta is None else eta), seed=seeds, guidance=g,
                        teacher_mode=g != 1.0)


def build_pipeline(resolved: ResolvedModel, *, device: str = "cpu") -> RegisteredPipeline:
    """Build the backbone from the resolved params and merge the LoRA stack in its order."""
    # lazy below: these import torch; resolving and listing models must not
    from rtdmd.backbones import build_backbone
    from rtdmd.eval.variants import Variant, VariantError, build_variant_net
    from rtdmd.lora.artifact import load_lora_artifact

    stack = [load_lora_artifact(d, backbone=resolved.params.name) for d in resolved.stack_dirs]
    bb = build_backbone(resolved.params, device=device)
    variant = Variant(name="registered", kind="lora", step_list=list(resolved.sampler.step_list),
                      eta=resolved.sampler.eta, guidance=resolved.sampler.guidance,
                      lora_uris=list(resolved.stack_dirs), follow_parents=False, spec=resolved.ref.text)
    try:
        net = build_variant_net(bb, variant, stack)
    except VariantError as exc:
        raise RegistryError(f"{resolved.label}: {exc}") from None
    return RegisteredPipeline(resolved=resolved, backbone=bb, generator=net, stack=stack)
