"""The typed run context every flow step reads, and the helpers derived from it.

:func:`rtdmd.pipeline.plan.plan_run` builds one :class:`RunContext` in ``start``; Metaflow stores it
as an artifact, so ``resume`` clones it and every later step (and every ``@retry`` attempt) sees
the same logical run, params and plans. It holds only plain values (strings, numbers, the resolved
params as a mapping) — tensors never enter Metaflow.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rtdmd.artifacts.store import is_s3, s3_client, split_s3
from rtdmd.pipeline import launch as L
from rtdmd.pipeline.artifacts import RunLayout
from rtdmd.pipeline.errors import PipelineError
from rtdmd.pipeline.profiles import StagePlan
from rtdmd.tracking import Tracker

STAGE_ORDER = ("prep", "cold_start", "rl", "eval")
BUILTIN_DATASETS = ("toy2d",)  # = rtdmd.eval.prompts.BUILTIN_DATASETS (not imported: it pulls in torch)


class StageError(PipelineError):
    """A flow stage failed; the message says which and why."""

    headline = "RTDMD stage failed"


@dataclass
class RunContext:
    """What ``start`` resolved for one logical flow run."""

    flow: str
    run_id: str  # Metaflow run id of the run that planned (``start``)
    logical_run_id: str  # origin run id after ``resume``: the key of every stage output
    backbone: str  # params name
    backbone_arg: str  # as given on the command line (a name or a YAML path)
    overrides: list[str]
    stages: list[str]  # subset of STAGE_ORDER, in order
    profile: str  # local | kubernetes
    deploy: dict[str, Any]
    artifact_root: str
    tracking_uri: str
    experiment: str
    params: dict[str, Any]  # resolved params as a mapping (the file every stage's --config is written from)
    params_hash: str
    plans: dict[str, StagePlan]
    world_sizes: dict[str, int]
    given: dict[str, str | None]  # --cold-start-uri / --rl-uri by stage
    given_manifests: dict[str, dict[str, Any]]
    eval_args: list[str]
    git: dict[str, Any]
    pathspec: str
    parent_run_id: str | None = None  # the MLflow parent run (None until created, or with skip_services)
    # the cold-start milestone RL starts from (rl.init_milestone), and the step the cold start stops
    # at (= that milestone unless --full-cold-start; None = the full schedule)
    init_milestone: int | None = None
    cold_start_stop: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def layout(self) -> RunLayout:
        return RunLayout(self.artifact_root, self.flow, self.logical_run_id)

    def tracker(self) -> Tracker:
        return Tracker(self.tracking_uri, self.experiment)

    def params_file(self) -> str:
        """The run's resolved params as a local YAML file for ``--config`` (what start validated)."""
        d = Path(tempfile.mkdtemp(prefix="rtdmd-params-"))
        path = d / f"{self.backbone}.yaml"
        path.write_text(yaml.safe_dump(self.params, sort_keys=False))
        return str(path)

    def stage_nproc(self, stage: str) -> tuple[int, str]:
        """``(nproc_per_node, backend)`` of a stage on this node."""
        plan = self.plans[stage]
        if plan.nproc_per_node is not None:  # kubernetes: GPUs per node
            return int(plan.nproc_per_node), "nccl" if plan.gpus_per_node else "gloo"
        if stage == "eval":
            gpus = L.visible_gpus()
            return (gpus, "nccl") if gpus else (1, "gloo")
        return L.local_nproc(self.params["compute"]["local_nproc"])

    def trainer_env(self, mlflow_run_id: str | None) -> dict[str, str]:
        """Environment of a torchrun job: rank 0 of node 0 logs to ``mlflow_run_id``; others never log."""
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("MLFLOW_RUN_ID", None)
        if mlflow_run_id:
            env["MLFLOW_TRACKING_URI"] = self.tracking_uri
            env["MLFLOW_RUN_ID"] = mlflow_run_id
        else:
            env.pop("MLFLOW_TRACKING_URI", None)
        return env

    def run_of(self, pathspec: str) -> str:
        """Run id of a task pathspec ``Flow/run/step/task`` (the *current* run, also after ``resume``)."""
        parts = str(pathspec).split("/")
        return parts[1] if len(parts) > 1 else self.run_id

    def tags(self, pathspec: str, stage: str) -> dict[str, Any]:
        return {"rtdmd.backbone": self.backbone, "metaflow.flow": self.flow, "metaflow.run_id": self.run_of(pathspec),
                "metaflow.pathspec": pathspec, "git.commit": self.git.get("commit_sha"),
                "rtdmd.params_hash": self.params_hash, "rtdmd.stage": stage}


def repo_root() -> Path:
    """Directory the trainers run in (relative paths in params resolve from it)."""
    env = os.environ.get("RTDMD_REPO_ROOT")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2]
    return here if (here / "params").is_dir() else Path.cwd()


def cache_dir() -> Path:
    """Stable local cache for fetched S3 artifacts (the same path in every attempt)."""
    return Path(os.environ.get("RTDMD_CACHE_DIR") or Path.home() / ".cache" / "rtdmd" / "artifacts")


def write_text(uri: str, text: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=text.encode())
    else:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        Path(uri).write_text(text)
