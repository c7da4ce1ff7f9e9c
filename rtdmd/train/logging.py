"""Training loggers: one interface, a real logger on global rank 0 and a null logger elsewhere.

Every rank calls the same API (``log_metrics(step, dict)``, ``log_params(dict)``, ``close()``)
so no call site branches on the rank; metrics are reduced (mean) across ranks *before* they
reach the logger (:func:`rtdmd.dist.reduce_mean`), so rank 0 logs global values.

* :class:`JsonlLogger` appends ``{"step": n, ...}`` lines to ``<out>/metrics.jsonl`` (flushed
  per line; on resume it keeps appending, so a step may appear twice after a crash — the later
  line wins).
* :class:`MlflowLogger` is used only when ``MLFLOW_TRACKING_URI`` is set (the pipeline layer
  owns run bookkeeping; set ``MLFLOW_RUN_ID`` to log into an existing run). Metric names are
  logged as the trainer names them (``fake/ac``: the MLflow UI groups them by the part before
  ``/``). The run also gets MLflow's system metrics (``system/cpu_utilization_percentage``,
  memory, disk, network, GPU with ``nvidia-ml-py``), sampled every
  ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (MLflow's default 10) by a thread of this
  rank-0 process; ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`` turns them off.
* :func:`log0` prints on rank 0 only.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from rtdmd.artifacts.store import is_s3


class Logger:
    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:  # pragma: no cover - interface
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class NullLogger(Logger):
    """Accepts everything, writes nothing (non-zero ranks)."""


class JsonlLogger(Logger):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)
        self._f.write(json.dumps(row, sort_keys=True) + "\n")
        self._f.flush()

    def log_params(self, params: Mapping[str, Any]) -> None:
        (self.path.parent / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True, default=str))

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class MlflowLogger(Logger):
    """Minimal MLflow sink (metrics + flattened params); the flow engineer extends it."""

    def __init__(self, run_name: str | None = None):
        import mlflow

        self._mlflow = mlflow
        # honour the environment at construction: mlflow caches a tracking URI per process
        if os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        run_id = os.environ.get("MLFLOW_RUN_ID")
        if run_id:  # the run's own experiment (start_run refuses another active one)
            mlflow.set_experiment(experiment_id=mlflow.get_run(run_id).info.experiment_id)
        else:
            # ... and its active experiment, which may belong to another store
            exp_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
            try:
                known = bool(exp_id) and mlflow.get_experiment(exp_id) is not None
            except Exception:
                known = False
            if not known:
                mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default")
        # the sampler's start/stop INFO lines are noise in a stage's log (a failed stage ends on its error line)
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self._run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=bool(mlflow.active_run()),
                                     log_system_metrics=system_metrics_wanted())

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=int(step))

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = {k: str(v)[:500] for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            self._mlflow.log_params(dict(items[i: i + 100]))

    def close(self) -> None:
        self._mlflow.end_run()


def system_metrics_wanted() -> bool | None:
    """MLflow system metrics on the run: on by default; ``$MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING``
    (when set) decides — None lets MLflow read it."""
    return None if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING") else True


class MultiLogger(Logger):
    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log_metrics(self, step, metrics):
        for lg in self.loggers:
            lg.log_metrics(step, metrics)

    def log_params(self, params):
        for lg in self.loggers:
            lg.log_params(params)

    def close(self):
        for lg in self.loggers:
            lg.close()


def build_logger(rank: int, out_dir: str, run_name: str | None = None) -> Logger:
    """Rank 0: JSONL under ``out_dir`` (for an s3:// output under ``$RTDMD_LOG_DIR`` or the system
    temp dir) plus MLflow when ``MLFLOW_TRACKING_URI`` is set. Other ranks: :class:`NullLogger`."""
    if rank != 0:
        return NullLogger()
    if is_s3(out_dir):
        import tempfile

        root = Path(os.environ.get("RTDMD_LOG_DIR") or Path(tempfile.gettempdir()) / "rtdmd-logs")
        local = root / out_dir.replace("s3://", "").replace("/", "__")
    else:
        local = Path(out_dir)
    loggers: list[Logger] = [JsonlLogger(local / "metrics.jsonl")]
    if os.environ.get("MLFLOW_TRACKING_URI"):
        loggers.append(MlflowLogger(run_name))
    return loggers[0] if len(loggers) == 1 else MultiLogger(loggers)


def log0(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, file=sys.stderr, flush=True)
