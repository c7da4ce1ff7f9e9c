"""The prepared prompt sets as MLflow dataset inputs of the runs that read them.

``prep`` publishes the validated prompt sets (``<prep artifact>/prompts/<dataset>``) and records
their DVC version (``dvc.lock``'s md5 of ``data/prompts`` and the git commit). Every run that
reads them logs them with ``log_input`` (metadata only: source = the published directory, digest
= the DVC md5, or the prep's own ``data_version`` when the prompts are not DVC-tracked):

* the ``prep`` stage run: every non-empty split (context ``training`` for ``train``,
  ``evaluation`` for ``test``);
* a training stage run: the stage's prompt set, split ``train`` (context ``training``);
* an evaluation run: the datasets its rewards are routed to, split ``test`` (context ``evaluation``).

Dataset names are ``<dataset>/<split>``; the profile holds the prompt count, the input tags the
split, the prep's data version and the DVC record (md5, commit, path).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from rtdmd.artifacts.store import join
from rtdmd.tracking import Tracker

CONTEXT = {"train": "training", "test": "evaluation"}


def digest(prep: Mapping[str, Any]) -> str:
    """The version of the prepared data: the DVC md5 when DVC tracks the prompts, else the prep's
    content hash (``data_version``)."""
    dvc = prep.get("dvc") or {}
    return str(dvc.get("md5") or prep.get("data_version") or "unversioned")


def prepared_inputs(prep: Mapping[str, Any] | None, split: str,
                    names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Dataset records (for :meth:`rtdmd.tracking.Tracker.log_datasets`) of the non-empty
    ``split`` of the prepared datasets (only ``names`` when given)."""
    if not prep:
        return []
    wanted = None if names is None else set(names)
    dvc = prep.get("dvc") or {}
    out = []
    for ds, splits in sorted((prep.get("counts") or {}).items()):
        n = int((splits or {}).get(split, 0))
        if n <= 0 or (wanted is not None and ds not in wanted):
            continue
        out.append({"name": f"{ds}/{split}", "uri": join(prep["uri"], "prompts", ds), "digest": digest(prep),
                    "profile": {"split": split, "num_prompts": n},
                    "tags": {"rtdmd.split": split, "rtdmd.data_version": prep.get("data_version"),
                             "rtdmd.dvc.md5": dvc.get("md5"), "rtdmd.dvc.commit": dvc.get("commit"),
                             "rtdmd.dvc.path": dvc.get("path")}})
    return out


def stage_datasets(params: Mapping[str, Any], stage: str) -> set[str]:
    """The prepared datasets a stage reads: its prompt set (training) or the evaluation datasets."""
    if stage == "eval":
        return set(params["eval"]["reward_dataset_map"].values())
    return {Path(params[stage]["prompts"]).name}


def log_prepared(tr: Tracker, run_id: str, prep: Mapping[str, Any] | None, split: str,
                 names: Iterable[str] | None = None) -> None:
    """Log the prepared datasets as inputs of ``run_id``; a tracking failure is a warning (the
    data versions are also in the run's tags), never a failed step."""
    try:
        tr.log_datasets(run_id, prepared_inputs(prep, split, names), CONTEXT[split])
    except Exception as exc:  # noqa: BLE001 - observability must not fail the step
        print(f"[rtdmd] warning: could not log the prepared datasets on MLflow run {run_id}: {exc}", file=sys.stderr)
