"""Checks run in the flow's ``start`` step, before any training: a wrong backbone, a params typo,
an unreachable MLflow or S3 endpoint, or a missing init artifact fails here with one clear line.
"""
from __future__ import annotations

from typing import Iterable

from rtdmd.artifacts.fs import ArtifactError
from rtdmd.artifacts.store import artifact_exists, is_s3, read_remote_manifest
from rtdmd.config import ConfigError, load_params
from rtdmd.pipeline.artifacts import ArtifactRootError, check_root
from rtdmd.pipeline.errors import PipelineError
from rtdmd.tracking import TrackingError, check_tracking


class PreflightError(PipelineError):
    """The run cannot start; the message says what to fix."""

    headline = "RTDMD preflight check failed (nothing was trained)"


def load_run_params(backbone: str, overrides: Iterable[str]):
    """Typed params of the run (unknown backbone / typo'd key / bad value -> PreflightError)."""
    try:
        return load_params(backbone, list(overrides))
    except ConfigError as exc:
        raise PreflightError(f"params: {exc}") from None
    except ValueError as exc:  # validate() range checks
        raise PreflightError(f"params for '{backbone}': {exc}") from None


def check_world_sizes(params, world_sizes: dict[str, int]) -> None:
    """Global batches must divide the planned world size of each stage (fail before any model)."""
    for stage, world in world_sizes.items():
        if stage not in ("cold_start", "rl"):
            continue
        try:
            params.check_world_size(world, stage)
        except ValueError as exc:
            raise PreflightError(f"{stage} with {world} process(es): {exc}") from None


def check_init_artifact(uri: str, *, backbone: str, expected_stage: str | None, flag: str) -> dict:
    """The artifact given with ``flag`` exists, is complete and belongs to ``backbone``; returns its manifest."""
    try:
        exists = artifact_exists(uri)
    except Exception as exc:  # noqa: BLE001 - endpoint errors
        raise PreflightError(f"{flag} {uri}: cannot be checked ({exc})") from None
    if not exists:
        where = "no manifest.json under that S3 prefix" if is_s3(uri) else "no manifest.json in that directory"
        raise PreflightError(f"{flag} {uri} does not exist or is incomplete ({where}); pass the URI of a "
                             "published artifact, e.g. <artifact root>/<Flow>/<run>/cold_start/artifact")
    try:
        manifest = read_remote_manifest(uri)
    except ArtifactError as exc:
        raise PreflightError(f"{flag} {uri}: {exc}") from None
    if manifest.get("kind") != "rtdmd-lora":
        raise PreflightError(f"{flag} {uri} is not an RTDMD LoRA artifact (kind={manifest.get('kind')!r})")
    if manifest.get("backbone") != backbone:
        raise PreflightError(f"{flag} {uri} was trained for backbone '{manifest.get('backbone')}', not '{backbone}'")
    if expected_stage and manifest.get("stage") != expected_stage:
        raise PreflightError(f"{flag} {uri} is a '{manifest.get('stage')}' artifact; expected a '{expected_stage}' artifact")
    verify_artifact_files(uri, flag)
    return manifest


def verify_artifact_files(uri: str, flag: str) -> None:
    """Every file of the given artifact matches its manifest (sha256, no missing/extra/unsafe paths)."""
    import tempfile

    from rtdmd.artifacts.fs import verify_manifest
    from rtdmd.artifacts.store import fetch_dir

    try:
        if is_s3(uri):
            with tempfile.TemporaryDirectory(prefix="rtdmd-preflight-") as tmp:
                fetch_dir(uri, tmp)
        else:
            verify_manifest(uri)
    except ArtifactError as exc:
        raise PreflightError(f"{flag} {uri} fails verification: {exc}") from None


def check_services(*, artifact_root: str, tracking_uri: str) -> None:
    """Artifact root (S3 endpoint / bucket or local dir) and MLflow store are usable."""
    try:
        check_root(artifact_root)
    except ArtifactRootError as exc:
        raise PreflightError(str(exc)) from None
    try:
        check_tracking(tracking_uri)
    except TrackingError as exc:
        raise PreflightError(str(exc)) from None
