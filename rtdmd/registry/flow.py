"""What the flow's ``register`` step registers (called by :func:`rtdmd.pipeline.registration.register`).

Registers the run's final LoRA stack as a new version of ``rtdmd-<backbone>`` with alias
``candidate``, its files logged under the flow's MLflow parent run, its evaluation taken from the
run's evaluation matrix, and the Metaflow pathspec + MLflow run ids as lineage tags. Promotion is
a separate, gated action (``rtdmd promote``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from rtdmd.artifacts.store import is_s3
from rtdmd.config import load_params
from rtdmd.registry.register import register_candidate


def _run_params(artifact_uri: str, params: Any, backbone: str):
    """The run's resolved params: given, or ``<run dir>/params.yaml`` next to the stage dirs
    (``rtdmd.pipeline.artifacts`` layout), or ``params/<backbone>.yaml``."""
    if params is not None:
        return params

    if not is_s3(artifact_uri):
        candidate = Path(artifact_uri).parent.parent / "params.yaml"
        if candidate.is_file():
            return load_params(candidate)
    return backbone


def register_from_flow(*, backbone: str, artifact_uri: str, manifest: Mapping[str, Any] | None = None,
                       cold_start_uri: str | None = None, eval_summary: Mapping[str, Any] | None = None,
                       parent_run_id: str | None = None, tracking_uri: str | None = None,
                       experiment: str | None = None, pathspec: str | None = None, params: Any = None,
                       **extra: Any) -> dict[str, Any]:
    lineage = {"metaflow.pathspec": pathspec, "rtdmd.flow.parent_run_id": parent_run_id,
               "metaflow.run_id": (pathspec or "").split("/")[1] if pathspec and "/" in pathspec else None,
               **{f"rtdmd.flow.{k}": v for k, v in extra.items() if isinstance(v, (str, int, float))}}
    return register_candidate(artifact_uri=artifact_uri, params=_run_params(artifact_uri, params, backbone),
                              backbone=backbone, evaluation=eval_summary, cold_start_uri=cold_start_uri,
                              tracking_uri=tracking_uri, run_id=parent_run_id, experiment=experiment,
                              lineage=lineage)
