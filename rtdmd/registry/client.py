"""Connecting to the MLflow registry and resolving model references.

Model references accepted everywhere (``load_registered``, ``rtdmd infer/eval/promote``)::

    models:/rtdmd-toy2d@champion     alias          rtdmd-toy2d@champion   toy2d@champion
    models:/rtdmd-toy2d/3            version        rtdmd-toy2d/3          toy2d/3
    /path/to/rl/artifact             LoRA artifact (local directory with manifest.json)
    s3://bucket/prefix/rl/artifact   LoRA artifact on S3

A bare backbone name (``toy2d@champion``) means the registered model ``rtdmd-<backbone>``.

The registry is the tracking store (``MLFLOW_TRACKING_URI``, default sqlite under ``mlruns/``, see
:mod:`rtdmd.tracking`); it is checked for reachability first, so an unreachable server
fails in about a second with one clear line instead of MLflow's minutes of HTTP retries.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtdmd.artifacts.store import is_s3
from rtdmd.registry.constants import LOCK_SUFFIX, MODEL_PREFIX
from rtdmd.registry.errors import ModelRefError, RegistryError, RegistryUnreachable
from rtdmd.tracking import TrackingError, check_tracking
from rtdmd.tracking import tracking_uri as default_uri
_REF = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]*?)(?:@(?P<alias>[A-Za-z][A-Za-z0-9_\-]*)|/(?P<version>\d+))$")


def model_name(backbone_or_params: Any) -> str:
    """``rtdmd-<backbone>`` (or ``registry.model_name`` of a :class:`Params`)."""
    if hasattr(backbone_or_params, "registry"):
        return backbone_or_params.registry.model_name or f"{MODEL_PREFIX}{backbone_or_params.name}"
    name = str(backbone_or_params)
    return name if name.startswith(MODEL_PREFIX) else f"{MODEL_PREFIX}{name}"


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    return tracking_uri or default_uri()


def connect(tracking_uri: str | None = None, *, check: bool = True):
    """An ``MlflowClient`` for the tracking store + registry at ``tracking_uri`` (checked first)."""
    uri = resolve_tracking_uri(tracking_uri)
    if check:
        try:
            check_tracking(uri, timeout=5.0)
        except TrackingError as exc:
            raise RegistryUnreachable(f"model registry unreachable: {exc}") from None
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def quiet_mlflow():
    """MLflow's INFO logs and artifact progress bars off: registering and loading print nothing
    beyond what the ``rtdmd`` command itself reports."""
    import logging

    logger = logging.getLogger("mlflow")
    level, bar = logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    logger.setLevel(logging.WARNING)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def error_code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", "") or "")


def is_not_found(exc: BaseException) -> bool:
    return error_code(exc) == "RESOURCE_DOES_NOT_EXIST" or (
        error_code(exc) == "INVALID_PARAMETER_VALUE" and "not found" in str(exc))


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference: a registered version/alias (``name`` set) or an artifact URI."""

    text: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    artifact_uri: str | None = None

    @property
    def is_registered(self) -> bool:
        return self.name is not None

    @property
    def uri(self) -> str:
        if self.artifact_uri:
            return self.artifact_uri
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def parse_ref(text: str) -> ModelRef:
    """Parse a model reference (see the module docstring); raises :class:`ModelRefError`."""

    raw = str(text or "").strip()
    if not raw:
        raise ModelRefError("empty model reference; give e.g. models:/rtdmd-toy2d@champion, toy2d/3 or an artifact path")
    if is_s3(raw):
        return ModelRef(raw, artifact_uri=raw)
    body = raw[len("models:/"):] if raw.startswith("models:/") else None
    if body is None and (Path(raw).exists() or raw.startswith((".", "/", "~"))):
        path = Path(raw).expanduser()
        if not (path / "manifest.json").is_file():
            raise ModelRefError(f"{raw} is not a LoRA artifact (no manifest.json in that directory)")
        return ModelRef(raw, artifact_uri=str(path))
    m = _REF.match(body if body is not None else raw)
    if not m:
        raise ModelRefError(
            f"cannot parse model reference {raw!r}: expected models:/<name>@<alias>, models:/<name>/<version>, "
            "<backbone>@<alias>, <backbone>/<version> or the path/s3:// URI of a LoRA artifact")
    return ModelRef(raw, name=model_name(m.group("name")), version=m.group("version"), alias=m.group("alias"))


def get_version(client, ref: ModelRef):
    """The ``ModelVersion`` of a registered reference; unknown model/version/alias -> ModelRefError."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(ref.name)
    except MlflowException as exc:
        if is_not_found(exc):
            known = [m.name for m in client.search_registered_models(max_results=100)
                     if m.name.startswith(MODEL_PREFIX) and not m.name.endswith(LOCK_SUFFIX)]
            raise ModelRefError(f"registered model '{ref.name}' does not exist"
                                + (f" (registered: {', '.join(sorted(known))})" if known else
                                   " (nothing is registered yet: run the flow, or rtdmd.registry.register_candidate)")
                                ) from None
        raise RegistryError(f"registry error reading '{ref.name}': {exc}") from None
    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        return client.get_model_version(ref.name, ref.version)
    except MlflowException as exc:
        if not is_not_found(exc):
            raise RegistryError(f"registry error resolving {ref.uri}: {exc}") from None
        rm = client.get_registered_model(ref.name)
        aliases = ", ".join(f"{a}->v{v}" for a, v in sorted((rm.aliases or {}).items())) or "none"
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{ref.name}'"))
        what = f"alias '{ref.alias}'" if ref.alias else f"version {ref.version}"
        raise ModelRefError(f"{ref.uri}: {what} of '{ref.name}' does not exist (aliases: {aliases}; versions: "
                            f"{', '.join(map(str, versions)) or 'none'})") from None


