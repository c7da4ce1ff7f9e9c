"""Artifact-root layout of a flow run (DESIGN.md §4), keyed by logical run and stage.

::

    <root>/<FlowName>/<logical run id>/
        params.yaml                  resolved params of the run (what every stage trained with)
        prep/                        prepared prompts (manifest.json with data_version)
        cold_start/artifact/         LoRA artifact (manifest.json last / atomic rename)
        cold_start/checkpoints/      in-step checkpoints (step-<N>/ ... COMPLETE)
        cold_start/metrics.jsonl     rank-0 metrics (local roots; S3 roots log under ./outputs)
        rl/artifact/ rl/checkpoints/ rl/metrics.jsonl
        eval/<variant>/              per-variant evaluation output
        eval/matrix.{json,csv,md}    the evaluation matrix

The **logical run id** is the id of the run that started the lineage: a fresh run uses its own
id; ``resume`` clones ``start`` (which stores it), so every resumed run — and every ``@retry``
attempt inside a run — writes to, and resumes from, the same directories. Keys never contain the
attempt number.

Root: ``$RTDMD_ARTIFACT_ROOT`` (a local directory or ``s3://bucket/prefix``); default
``./runs/artifacts`` on the local profile and ``<METAFLOW_DATASTORE_SYSROOT_S3>/rtdmd-artifacts``
on the kubernetes profile. S3 endpoints come from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` /
``METAFLOW_S3_ENDPOINT_URL`` (any S3-compatible store).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rtdmd.artifacts.store import is_s3, join, s3_client, s3_endpoint, split_s3

STAGES = ("prep", "cold_start", "rl", "eval")


class ArtifactRootError(RuntimeError):
    """The artifact root is unusable (unreachable endpoint, missing bucket, unwritable dir)."""


def default_artifact_root(profile: str = "local") -> str:
    env = os.environ.get("RTDMD_ARTIFACT_ROOT")
    if env:
        return env if is_s3(env) else str(Path(env).resolve())
    if profile == "kubernetes":
        sysroot = os.environ.get("METAFLOW_DATASTORE_SYSROOT_S3")
        if not sysroot:
            raise ArtifactRootError(
                "the kubernetes profile needs an S3 artifact root: set RTDMD_ARTIFACT_ROOT=s3://bucket/prefix "
                "(or METAFLOW_DATASTORE_SYSROOT_S3, whose <sysroot>/rtdmd-artifacts is then used)")
        return join(sysroot, "rtdmd-artifacts")
    return str(Path("runs/artifacts").resolve())


@dataclass(frozen=True)
class RunLayout:
    root: str
    flow: str
    run: str  # logical (origin) run id

    @property
    def base(self) -> str:
        return join(self.root, self.flow, self.run) if is_s3(self.root) else str(Path(self.root, self.flow, self.run))

    def _join(self, *parts: str) -> str:
        return join(self.base, *parts) if is_s3(self.root) else str(Path(self.base, *parts))

    def stage_dir(self, stage: str) -> str:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        return self._join(stage)

    def artifact_uri(self, stage: str) -> str:
        return self._join(stage, "artifact") if stage != "prep" else self._join("prep")

    def checkpoint_dir(self, stage: str) -> str:
        return self._join(stage, "checkpoints")

    def eval_dir(self, variant: str | None = None) -> str:
        return self._join("eval", variant) if variant else self._join("eval")

    def params_uri(self) -> str:
        return self._join("params.yaml")


def check_root(root: str, timeout: float = 5.0) -> None:
    """Fail fast when the root is unusable: S3 endpoint unreachable / bucket missing / no access,
    or a local directory that cannot be created or written."""
    if not is_s3(root):
        p = Path(root)
        try:
            p.mkdir(parents=True, exist_ok=True)
            probe = p / f".rtdmd-write-probe-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ArtifactRootError(f"artifact root {root} is not writable: {exc}") from None
        return
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _ = split_s3(root)
    endpoint = s3_endpoint()
    where = f"S3 endpoint {endpoint}" if endpoint else "the default AWS S3 endpoint"
    client = s3_client(timeout=timeout, connect_timeout=timeout, attempts=1)
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise ArtifactRootError(f"artifact root {root}: bucket '{bucket}' does not exist at {where}") from None
        raise ArtifactRootError(f"artifact root {root}: {where} refused access to bucket '{bucket}' ({code or exc})") from None
    except (BotoCoreError, OSError) as exc:
        raise ArtifactRootError(
            f"artifact root {root}: {where} is unreachable ({type(exc).__name__}: {exc}); check "
            "AWS_ENDPOINT_URL_S3 / METAFLOW_S3_ENDPOINT_URL and that the server is running") from None
