"""Load a registered RTDMD model (or a LoRA artifact) as ready pipeline parts — one call::

    from rtdmd.registry import load_registered

    m = load_registered("models:/rtdmd-toy2d@champion")     # alias, version, or artifact URI
    x = m.generate(["ring", "square"], seed=0)              # rtdmd.sampling.generate, registered sampler
    m.backbone, m.generator, m.sampler, m.params            # the parts, for your own loop

``load_registered`` resolves the reference (:mod:`rtdmd.registry.client`), downloads the version's
files once into a cache (``$RTDMD_CACHE_DIR/registry`` or ``~/.cache/rtdmd/registry``), verifies
every file against its artifact manifest and the manifest checksums recorded at registration,
builds the backbone from the registered ``params.yaml`` (base model id + revision), and merges the
LoRA stack into the generator in its registered order. The sampler settings are the registered
ones (NFE / step list, eta, guidance) unless overridden.

:func:`resolve_model` does the same without building any network (what ``rtdmd eval`` uses).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rtdmd.artifacts.fs import ArtifactError, atomic_dir, verify_manifest
from rtdmd.artifacts.store import read_remote_manifest
from rtdmd.config import load_params
from rtdmd.registry import evaluation as E
from rtdmd.registry.client import ModelRef, connect, get_version, parse_ref, resolve_tracking_uri
from rtdmd.registry.errors import ModelRefError, RegistryError
from rtdmd.registry.constants import FORMAT, MODEL_FILE


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


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    base = os.environ.get("RTDMD_CACHE_DIR")
    return (Path(base) / "registry") if base else Path.home() / ".cache" / "rtdmd" / "registry"


def _verify_version_dir(root: Path, expect_shas: Sequence[str] | None = None) -> dict:
    """Check ``rtdmd_model.json`` and every stack artifact's files; returns the info dict."""

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


def _download(client, mv, tracking_uri: str, cache_dir) -> tuple[Path, dict]:
    import mlflow


    key = hashlib.sha1(f"{tracking_uri}|{mv.name}|{mv.version}|{mv.source}".encode()).hexdigest()[:16]
    target = _cache_root(cache_dir) / f"{mv.name}-v{mv.version}-{key}"
    if target.is_dir():
        try:
            return target, _verify_version_dir(target)
        except (RegistryError, OSError, json.JSONDecodeError):
            shutil.rmtree(target, ignore_errors=True)  # corrupt cache: fetch again
    try:
        with atomic_dir(target) as tmp:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(tmp),
                                                           tracking_uri=tracking_uri))
            if got != tmp:  # downloads land in <dst>/<last path component>
                for child in got.iterdir():
                    shutil.move(str(child), str(tmp / child.name))
                got.rmdir()
            info = _verify_version_dir(tmp)
    except RegistryError:
        raise
    except Exception as exc:  # noqa: BLE001 - artifact store errors
        raise RegistryError(f"cannot download {mv.name} v{mv.version} from {mv.source}: {exc}") from None
    return target, info


def _params_from(path: Path, overrides: Sequence[str]):
    return load_params(path, list(overrides))


def _apply_sampler(params, s: SamplerSettings):
    params.sampler.step_list = [int(x) if float(x).is_integer() else x for x in s.step_list]
    params.sampler.eta = float(s.eta)
    params.sampler.guidance = float(s.guidance)
    return params


def resolve_model(ref: str, *, tracking_uri: str | None = None, cache_dir=None, overrides: Sequence[str] = (),
                  backbone: str | None = None) -> ResolvedModel:
    """Resolve ``ref`` (registered alias/version or artifact URI) to verified local files + params.

    ``overrides`` are dotted params overrides applied to the registered params (or, for an
    artifact, to ``params/<backbone>.yaml``); ``backbone`` picks the params file of an artifact
    whose manifest lacks one.
    """
    mref = parse_ref(ref)
    if not mref.is_registered:
        return _resolve_artifact(mref, overrides=overrides, backbone=backbone)
    uri = resolve_tracking_uri(tracking_uri)
    client = connect(uri)
    mv = get_version(client, mref)
    root, info = _download(client, mv, uri, cache_dir)
    params = _params_from(root / "params.yaml", overrides)
    sampler = SamplerSettings([float(s) for s in info["sampler"].get("step_list") or params.sampler.step_list],
                              float(info["sampler"].get("eta", params.sampler.eta)),
                              float(info["sampler"].get("guidance", params.sampler.guidance)))

    return ResolvedModel(ref=mref, params=_apply_sampler(params, sampler),
                         stack_dirs=[str(root / e["dir"]) for e in info["stack"]], sampler=sampler, info=info,
                         name=mv.name, version=str(mv.version), aliases=list(mv.aliases or []), local_dir=root,
                         evaluation=E.from_tags(mv.tags or {}))


def _resolve_artifact(mref: ModelRef, *, overrides: Sequence[str], backbone: str | None) -> ResolvedModel:
    from rtdmd.lora.artifact import stack_chain  # lazy: torch (registry queries stay light)

    try:
        manifest = read_remote_manifest(mref.artifact_uri)
    except ArtifactError as exc:
        raise ModelRefError(f"{mref.text}: {exc}") from None
    name = backbone or manifest.get("backbone")
    if not name:
        raise ModelRefError(f"{mref.text}: the manifest names no backbone; pass --backbone")
    params = load_params(name, list(overrides))
    try:
        chain = stack_chain(mref.artifact_uri, backbone=params.name)
    except (ArtifactError, OSError, ValueError) as exc:
        raise ModelRefError(f"{mref.text}: {exc}") from None
    sm = chain[-1].manifest.get("sampler") or {}
    sampler = SamplerSettings([float(s) for s in sm.get("step_list") or params.sampler.step_list],
                              float(sm.get("eta", params.sampler.eta)), float(sm.get("guidance", params.sampler.guidance)))
    info = {"format": "artifact", "backbone": params.name, "base_model": chain[-1].manifest.get("base_model"),
            "stack": [{"order": i, "stage": a.manifest.get("stage"), "dir": str(a.path),
                       "manifest_sha256": a.manifest_sha256, "source_uri": str(a.uri)} for i, a in enumerate(chain)],
            "sampler": sampler.to_dict()}
    return ResolvedModel(ref=mref, params=_apply_sampler(params, sampler), stack_dirs=[str(a.path) for a in chain],
                         sampler=sampler, info=info)


@dataclass
class RegisteredPipeline:
    """Ready pipeline parts: backbone + generator (LoRA stack merged) + sampler settings."""

    resolved: ResolvedModel
    backbone: Any  # rtdmd.backbones.Backbone
    generator: Any  # torch.nn.Module, eval mode, no grad
    stack: list  # rtdmd.lora.artifact.LoraArtifact, merge order

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


def load_registered(ref: str, *, tracking_uri: str | None = None, device: str = "cpu", cache_dir=None,
                    overrides: Sequence[str] = (), backbone: str | None = None) -> RegisteredPipeline:
    """Resolve, fetch, verify and build ``ref`` (``models:/rtdmd-<backbone>@champion``, a version,
    or an artifact URI) into :class:`RegisteredPipeline` parts usable by ``rtdmd.sampling.generate``."""
    # lazy below: these import torch; resolving and listing models must not
    from rtdmd.backbones import build_backbone
    from rtdmd.eval.variants import Variant, VariantError, build_variant_net
    from rtdmd.lora.artifact import load_lora_artifact

    resolved = resolve_model(ref, tracking_uri=tracking_uri, cache_dir=cache_dir, overrides=overrides, backbone=backbone)
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
