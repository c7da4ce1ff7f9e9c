"""Load a registered RTDMD model (or a LoRA artifact) as ready pipeline parts — one call::

    from rtdmd.registry import load_registered

    m = load_registered("models:/rtdmd-toy2d@champion")     # alias, version, or artifact URI
    x = m.generate(["ring", "square"], seed=0)              # rtdmd.sampling.generate, registered sampler
    m.backbone, m.generator, m.sampler, m.params            # the parts, for your own loop
    m.pyfunc.predict(["ring"])                              # the MLflow pyfunc model it was loaded through

``load_registered`` is a thin layer on the version's MLflow pyfunc model
(:mod:`rtdmd.registry.pyfunc`; ``mlflow.pyfunc.load_model("models:/rtdmd-toy2d@champion")`` gives
the same samples): it resolves the reference (:mod:`rtdmd.registry.client`), downloads the version
once into a cache (``$RTDMD_CACHE_DIR/registry`` or ``~/.cache/rtdmd/registry``), verifies every
file against its artifact manifest, the manifest checksums recorded at registration and the
version's ``rtdmd.manifest_sha256`` tag, loads the pyfunc model from the cache (its
``load_context`` builds the backbone from the registered ``params.yaml`` — base model id +
revision — and merges the LoRA stack into the generator in its registered order), and adds the
registry's view (name, version, aliases, evaluation). The sampler settings are the registered
ones (NFE / step list, eta, guidance) unless overridden.

Versions registered before versions were pyfunc models (loose files under the run's
``registry/<sha12>/``) and LoRA artifact URIs are built directly by the same code
(:func:`rtdmd.registry.parts.build_pipeline`); ``mlflow.pyfunc.load_model`` cannot read those.

:func:`resolve_model` does the same without building any network (what ``rtdmd eval`` uses).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import yaml

from rtdmd.artifacts.fs import ArtifactError, atomic_dir
from rtdmd.artifacts.store import read_remote_manifest
from rtdmd.config import load_params
from rtdmd.registry import evaluation as E
from rtdmd.registry.client import ModelRef, connect, get_version, parse_ref, quiet_mlflow, resolve_tracking_uri
from rtdmd.registry.constants import ARTIFACT_KEY
from rtdmd.registry.errors import ModelRefError, RegistryError
from rtdmd.registry.parts import (RegisteredPipeline, ResolvedModel, SamplerSettings, apply_sampler, build_pipeline,
                                  resolve_local, verify_version_dir)

__all__ = ["RegisteredPipeline", "ResolvedModel", "SamplerSettings", "load_registered", "resolve_model"]


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    base = os.environ.get("RTDMD_CACHE_DIR")
    return (Path(base) / "registry") if base else Path.home() / ".cache" / "rtdmd" / "registry"


def rtdmd_dir(root: Path) -> Path:
    """The RTDMD files of a downloaded version: ``artifacts/rtdmd/`` of its pyfunc model (per the
    ``MLmodel`` file), or ``root`` itself for a version registered as loose files."""
    mlmodel = root / "MLmodel"
    if not mlmodel.is_file():
        return root
    flavor = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get("python_function") or {}
    rel = ((flavor.get("artifacts") or {}).get(ARTIFACT_KEY) or {}).get("path")
    if not rel:
        raise RegistryError(f"{root}: an MLflow model without RTDMD files (no '{ARTIFACT_KEY}' artifact)")
    return root / rel


def _download(client, mv, tracking_uri: str, cache_dir) -> tuple[Path, Path, dict]:
    """``(model dir, RTDMD files dir, rtdmd_model.json)`` of version ``mv``, cached and verified."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    key = hashlib.sha1(f"{tracking_uri}|{mv.name}|{mv.version}|{mv.source}".encode()).hexdigest()[:16]
    target = _cache_root(cache_dir) / f"{mv.name}-v{mv.version}-{key}"
    if target.is_dir():
        try:
            return target, rtdmd_dir(target), verify_version_dir(rtdmd_dir(target))
        except (RegistryError, OSError, json.JSONDecodeError, yaml.YAMLError):
            shutil.rmtree(target, ignore_errors=True)  # corrupt cache: fetch again
    try:
        with atomic_dir(target) as tmp:
            with _use_tracking_uri(tracking_uri), quiet_mlflow():  # models:/<model id>: through the global store
                got = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(tmp),
                                                               tracking_uri=tracking_uri))
            if got != tmp:  # downloads land in <dst>/<last path component>
                for child in got.iterdir():
                    shutil.move(str(child), str(tmp / child.name))
                got.rmdir()
            info = verify_version_dir(rtdmd_dir(tmp))
    except RegistryError:
        raise
    except Exception as exc:  # noqa: BLE001 - artifact store errors
        raise RegistryError(f"cannot download {mv.name} v{mv.version} from {mv.source}: {exc}") from None
    return target, rtdmd_dir(target), info


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
    model_dir, root, info = _download(client, mv, uri, cache_dir)
    tagged = (mv.tags or {}).get("rtdmd.manifest_sha256")
    if tagged and tagged != info["stack"][-1]["manifest_sha256"]:
        raise RegistryError(f"{mv.name} v{mv.version}: its files end in manifest sha256 "
                            f"{info['stack'][-1]['manifest_sha256'][:12]}… but the version is tagged {tagged[:12]}…")
    resolved = resolve_local(root, mref, overrides=overrides, info=info)
    resolved.name, resolved.version, resolved.aliases = mv.name, str(mv.version), list(mv.aliases or [])
    resolved.evaluation = E.from_tags(mv.tags or {})
    resolved.model_dir = model_dir if (model_dir / "MLmodel").is_file() else None
    return resolved


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
    return ResolvedModel(ref=mref, params=apply_sampler(params, sampler), stack_dirs=[str(a.path) for a in chain],
                         sampler=sampler, info=info)


def load_registered(ref: str, *, tracking_uri: str | None = None, device: str = "cpu", cache_dir=None,
                    overrides: Sequence[str] = (), backbone: str | None = None) -> RegisteredPipeline:
    """Resolve, fetch, verify and build ``ref`` (``models:/rtdmd-<backbone>@champion``, a version,
    or an artifact URI) into :class:`RegisteredPipeline` parts usable by ``rtdmd.sampling.generate``."""
    resolved = resolve_model(ref, tracking_uri=tracking_uri, cache_dir=cache_dir, overrides=overrides, backbone=backbone)
    if resolved.model_dir is None:  # an artifact URI, or a version registered as loose files
        return build_pipeline(resolved, device=device)
    import mlflow.pyfunc

    with quiet_mlflow():
        pm = mlflow.pyfunc.load_model(str(resolved.model_dir), model_config={
            "device": device, "overrides": list(overrides), "ref": resolved.ref.text})
    pipe = pm.unwrap_python_model().pipeline
    own = pipe.resolved  # built from the same verified files; add the registry's view of them
    own.ref, own.name, own.version, own.aliases = resolved.ref, resolved.name, resolved.version, resolved.aliases
    own.evaluation, own.model_dir = resolved.evaluation, resolved.model_dir
    pipe.pyfunc = pm
    return pipe
