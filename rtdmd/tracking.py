"""MLflow bookkeeping of a flow run (DESIGN.md §4 "MLflow").

Runs, all in the experiment ``rtdmd-<backbone>`` (``$MLFLOW_EXPERIMENT_NAME`` overrides)::

    <Flow>-<logical run>            kind=flow   one per logical flow run (resume continues it)
      ├─ prep                       kind=stage  data version, prompt counts, dataset inputs
      ├─ cold_start                 kind=stage  flattened params; the trainer's rank 0 logs its
      ├─ rl                         kind=stage  metrics and system metrics here (MLFLOW_RUN_ID);
      │                                         artifact URI tag; its prompt set as dataset input
      ├─ eval:<variant> ...         kind=eval   one metric per reward (metric key = reward name)
      └─ (parent) eval/matrix.{json,csv,md}, final artifact URI, evaluation summary

Tags on every run: ``rtdmd.logical_run_id``, ``rtdmd.backbone``, ``rtdmd.kind``,
``metaflow.flow``, ``metaflow.run_id`` (latest), ``metaflow.pathspec`` (step/task pathspec of
the latest attempt), ``git.commit``, ``rtdmd.data_version``, ``rtdmd.artifact_uri`` (stage
outputs), ``rtdmd.params_hash``. Stage and evaluation runs are found again by these tags, so a
resumed flow (or a ``@retry``) keeps writing into the same runs instead of forking new ones.

Tracking URI: ``$MLFLOW_TRACKING_URI``, default ``sqlite:///<cwd>/mlruns/mlflow.db`` (artifacts
next to it in ``mlruns/artifacts``). A cluster points it at an ``mlflow server`` URL.
"""
from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping

PARENT, STAGE, EVAL = "flow", "stage", "eval"


class TrackingError(RuntimeError):
    """The MLflow tracking store is unreachable or unusable."""


def default_tracking_uri() -> str:
    return f"sqlite:///{Path('mlruns/mlflow.db').resolve()}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def experiment_name(backbone: str) -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"rtdmd-{backbone}"


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (before any training) when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        errors = []
        for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
            try:
                with urllib.request.urlopen(base + path, timeout=timeout) as resp:
                    if resp.status < 500:
                        return
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    return
                errors.append(f"HTTP {exc.code} from {path}")
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise TrackingError(
                    f"MLflow tracking server {uri} is unreachable ({reason}); start it or fix "
                    "MLFLOW_TRACKING_URI") from None
        raise TrackingError(f"MLflow tracking server {uri} answers with errors: {'; '.join(errors)}")
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"MLflow sqlite store {uri}: cannot create {db.parent}: {exc}") from None
        if not os.access(db.parent, os.W_OK):
            raise TrackingError(f"MLflow sqlite store {uri}: {db.parent} is not writable")
        return
    if uri.startswith("file:") or uri.startswith("/") or uri.startswith("databricks"):
        return
    raise TrackingError(f"unsupported MLflow tracking URI {uri!r} (use http(s)://, sqlite:/// or file:)")


def git_info(repo: str | Path = ".") -> dict[str, Any]:
    """Commit of the code: ``$RTDMD_GIT_SHA``, the Metaflow code package's INFO (remote tasks),
    or ``git`` in ``repo``."""
    if os.environ.get("RTDMD_GIT_SHA"):
        return {"commit_sha": os.environ["RTDMD_GIT_SHA"]}
    try:
        from metaflow.packaging_sys import MetaflowCodeContent

        info = MetaflowCodeContent.get_info() or {}
        if info.get("commit_sha"):
            return {k: info[k] for k in ("commit_sha", "branch_name", "repo_url", "has_uncommitted_changes") if k in info}
    except Exception:  # noqa: BLE001 - Metaflow absent or no package
        pass
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {"commit_sha": sha, "has_uncommitted_changes": bool(dirty)} if sha else {}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _q(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


class Tracker:
    """Thin wrapper over ``MlflowClient`` for the flow's runs (no global fluent state)."""

    def __init__(self, uri: str | None = None, experiment: str = "rtdmd"):
        from mlflow.tracking import MlflowClient

        self.uri = uri or tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_name = experiment
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:///"):
                location = (Path(self.uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            except Exception:  # noqa: BLE001 - created concurrently by another step
                exp = self.client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
                self.experiment_id = exp.experiment_id
        else:
            self.experiment_id = exp.experiment_id

    # ---- finding / creating runs ------------------------------------------------------------
    def _find(self, tags: Mapping[str, str]):
        flt = " and ".join(f"tags.`{k}` = {_q(v)}" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=flt, max_results=5,
                                       order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def _get_or_create(self, key_tags: Mapping[str, str], run_name: str, parent_id: str | None,
                       tags: Mapping[str, Any]) -> tuple[str, bool]:
        found = self._find(key_tags)
        all_tags = {**{k: str(v) for k, v in tags.items() if v is not None}, **key_tags}
        if found is not None:
            run_id = found.info.run_id
            if found.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            self.set_tags(run_id, all_tags)
            return run_id, False
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=run_name)
        return run.info.run_id, True

    def parent_run(self, logical_run_id: str, flow: str, tags: Mapping[str, Any]) -> str:
        run_id, _ = self._get_or_create({"rtdmd.logical_run_id": logical_run_id, "rtdmd.kind": PARENT},
                                        f"{flow}-{logical_run_id}", None, tags)
        return run_id

    def stage_run(self, parent_id: str, logical_run_id: str, stage: str, *, params: Mapping[str, Any] | None = None,
                  tags: Mapping[str, Any] | None = None) -> str:
        run_id, created = self._get_or_create(
            {"rtdmd.logical_run_id": logical_run_id, "rtdmd.kind": STAGE, "rtdmd.stage": stage},
            stage, parent_id, tags or {})
        if created and params:
            self.log_params(run_id, params)
        return run_id

    def find_stage_run(self, logical_run_id: str, stage: str) -> str | None:
        found = self._find({"rtdmd.logical_run_id": logical_run_id, "rtdmd.kind": STAGE, "rtdmd.stage": stage})
        return found.info.run_id if found is not None else None

    def eval_run(self, parent_id: str, logical_run_id: str, variant: str, *, tags: Mapping[str, Any] | None = None) -> str:
        run_id, _ = self._get_or_create(
            {"rtdmd.logical_run_id": logical_run_id, "rtdmd.kind": EVAL, "rtdmd.variant": variant},
            f"eval:{variant}", parent_id, tags or {})
        return run_id

    # ---- logging ----------------------------------------------------------------------------
    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, tags=items[i: i + 100])

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(run_id, params=flat[i: i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 200):
            self.client.log_batch(run_id, metrics=items[i: i + 200])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_table(self, run_id: str, rows: list[Mapping[str, Any]], artifact_file: str) -> None:
        columns: dict[str, list] = {}
        keys: list[str] = []
        for r in rows:
            for k in r:
                if k not in keys:
                    keys.append(k)
        for k in keys:
            columns[k] = [r.get(k) for r in rows]
        self.client.log_table(run_id, data=columns, artifact_file=artifact_file)

    def log_files(self, run_id: str, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        for p in paths:
            self.client.log_artifact(run_id, str(p), artifact_path)

    def log_datasets(self, run_id: str, datasets: Iterable[Mapping[str, Any]], context: str) -> None:
        """``log_input`` of metadata-only datasets (the data stays where it is): each
        ``{"name", "uri", "digest", "profile", "tags"}`` becomes a dataset whose source is the URI
        (local path or ``s3://``) and whose digest is the given version (e.g. the DVC md5), input
        tags ``mlflow.data.context`` = ``context`` plus ``tags``."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for d in datasets:
            uri = str(d["uri"])
            # MLflow's artifact dataset sources ("s3" / "local"), serialised as they serialise themselves
            entity = Dataset(name=str(d["name"]), digest=str(d["digest"])[:36],
                             source_type="s3" if uri.startswith("s3://") else "local", source=json.dumps({"uri": uri}),
                             profile=json.dumps(d.get("profile") or {}, sort_keys=True))
            tags = [InputTag("mlflow.data.context", context)]
            tags += [InputTag(k, str(v)[:500]) for k, v in (d.get("tags") or {}).items() if v is not None]
            inputs.append(DatasetInput(entity, tags))
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def get_run(self, run_id: str):
        return self.client.get_run(run_id)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
