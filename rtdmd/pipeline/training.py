"""The flow's data and training steps: model assets, prompt prep, and one torchrun training
stage per node.

Stage outputs live under the artifact root keyed by the *logical* run (see
:mod:`rtdmd.pipeline.artifacts`), so a ``@retry`` attempt or a ``resume``-d run re-launches the
trainer with the same ``--out`` and it continues from its latest complete checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from rtdmd.artifacts.fs import read_manifest, verify_manifest
from rtdmd.artifacts.store import fetch_dir, is_s3, publish_dir
from rtdmd.data import dvc_workspace as W
from rtdmd.train.milestones import milestone_uri
from rtdmd.pipeline import datasets, launch as L
from rtdmd.pipeline.context import BUILTIN_DATASETS, RunContext, StageError, cache_dir, repo_root
from rtdmd.tracking import Tracker


def ensure_model_assets(ctx: RunContext) -> list[str]:
    """Locally built models the trainers load (``model.tiny``): the toy2d teacher (trained and
    cached, like the DVC stage ``toy2d_teacher``) or a tiny random-weight pipeline. Built once here
    so the torchrun ranks never race to create them. Returns what was built."""
    model = ctx.params["model"]
    if not model.get("tiny"):
        return []
    root = repo_root()
    out = Path(model["pretrained"])
    out = out if out.is_absolute() else root / out
    if model["family"] == "toy2d":
        if (out / "teacher.safetensors").is_file():  # rtdmd.backbones.toy2d.teacher_file (no torch import here)
            return []
        cmd = [sys.executable, "-m", "rtdmd.backbones.toy2d_teacher", "--out", str(out),
               "--params", str(root / "params" / "toy2d_teacher.yaml")]
    else:
        if (out / "model_index.json").is_file():
            return []
        cmd = [sys.executable, "-m", "rtdmd.backbones.tiny", "--kind", model["tiny_config"], "--out", str(out)]
    print(f"[rtdmd] building model assets: {' '.join(cmd)}", flush=True)
    res = subprocess.run(cmd, cwd=str(root), capture_output=True, text=True)
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    if res.returncode != 0:
        tail = "; ".join([ln for ln in res.stderr.splitlines() if ln.strip()][-4:])
        raise StageError(f"building {out} failed (exit {res.returncode}): {tail}")
    return [str(out)]


PREP_STAGE = "prepare"  # the dvc.yaml stage that prepares + validates the prompt sets


def reward_ckpt_root() -> Path | None:
    """The reward checkpoint directory the stages read (``$RTDMD_REWARD_CKPT_PATH``; unset: none,
    see :mod:`rtdmd.rewards.ckpt`)."""
    env = os.environ.get("RTDMD_REWARD_CKPT_PATH")
    return Path(env) if env else None


def run_prep(ctx: RunContext, pathspec: str) -> dict[str, Any]:
    """``dvc repro prepare`` (refusing outputs edited by hand, see :mod:`rtdmd.data.dvc_workspace`),
    publish the prepared sets under ``<run>/prep``; record the data and reward-checkpoint versions."""
    lay = ctx.layout()
    root = repo_root()
    tr = ctx.tracker()
    run_id = tr.stage_run(ctx.parent_run_id, ctx.logical_run_id, "prep",
                          tags=ctx.tags(pathspec, "prep"), params={"dvc_stage": PREP_STAGE})
    try:
        rewards_dir = reward_ckpt_root()
        try:
            reward_targets = W.tracked_targets(rewards_dir, root) if rewards_dir and (root / "dvc.yaml").is_file() else []
            dvc = W.reproduce(root, PREP_STAGE, also_check=reward_targets)
        except W.DvcWorkspaceError as exc:
            raise StageError(f"prep: {exc}") from None
        rewards = W.tracked_versions(rewards_dir, root) if rewards_dir else {}
        prepared = root / dvc["out"]
        manifest = json.loads((prepared / "manifest.json").read_text())
        with tempfile.TemporaryDirectory(prefix="rtdmd-prep-") as tmp:
            shutil.copytree(prepared, Path(tmp) / "prompts")
            fields = {"kind": "rtdmd-prompts", "data_version": manifest.get("data_version"),
                      "counts": manifest.get("counts"), "validation": manifest.get("validation"),
                      "dvc": {k: dvc.get(k) for k in ("commit", "stage", "out", "md5", "lock_committed")},
                      "reward_ckpts": rewards}
            publish_dir(tmp, lay.artifact_uri("prep"), fields)
        info = {"uri": lay.artifact_uri("prep"), "data_version": manifest.get("data_version"),
                "counts": manifest.get("counts", {}), "dvc": dvc, "reward_ckpts": rewards}
        version_tags = {"rtdmd.data_version": info["data_version"], "rtdmd.dvc.commit": dvc.get("commit"),
                        "rtdmd.dvc.md5": dvc.get("md5"), "rtdmd.dvc.lock_committed": dvc.get("lock_committed"),
                        "rtdmd.reward_ckpt_root": str(rewards_dir) if rewards_dir else None,
                        **{f"rtdmd.reward_ckpt.{path}": md5 for path, md5 in rewards.items()}}
        tr.set_tags(run_id, {**version_tags, "rtdmd.artifact_uri": info["uri"]})
        tr.set_tags(ctx.parent_run_id, version_tags)
        totals: dict[str, float] = {}
        for ds, splits in info["counts"].items():
            for split, n in splits.items():
                totals[f"prompts/{ds}/{split}"] = n
        tr.log_metrics(run_id, totals)
        for split in datasets.CONTEXT:
            datasets.log_prepared(tr, run_id, info, split)
        tr.finish(run_id)
        return info
    except BaseException:
        tr.finish(run_id, "FAILED")
        raise


def prep_local_dir(prep: Mapping[str, Any] | None) -> Path | None:
    """Local, checksum-verified copy of the prepared prompts (the artifact itself when local)."""
    if not prep:
        return None
    path = fetch_dir(prep["uri"], cache_dir()) if is_s3(prep["uri"]) else Path(prep["uri"])
    if not is_s3(prep["uri"]):
        verify_manifest(path)
    return path / "prompts"


def prompt_overrides(ctx: RunContext, prep: Mapping[str, Any] | None, stage: str) -> list[str]:
    """Point the stage's prompt path (and eval's dataset root) at the prepared, validated sets.

    A configured dataset ``.../<name>`` is replaced by ``<prep>/prompts/<name>`` when the prep
    artifact has a non-empty split of it; otherwise the configured path is kept as is.
    """
    local = prep_local_dir(prep)
    if local is None:
        return []
    counts = prep.get("counts", {})
    out = []
    if stage in ("cold_start", "rl"):
        key = f"{stage}.prompts"
        name = Path(ctx.params[stage]["prompts"]).name
        if counts.get(name, {}).get("train", 0) > 0:
            out.append(f"{key}={local / name}")
    elif stage == "eval":
        needed = set(ctx.params["eval"]["reward_dataset_map"].values())
        if needed and all(counts.get(ds, {}).get("test", 0) > 0 or ds in BUILTIN_DATASETS for ds in needed):
            out.append(f"eval.datasets_root={local}")
    return out


def run_training(ctx: RunContext, stage: str, *, init_uri: str | None, prep: Mapping[str, Any] | None,
                 pathspec: str, node_index: int = 0, num_nodes: int = 1,
                 while_training: Callable[[], Any] | None = None) -> dict[str, Any] | None:
    """Launch ``rtdmd.train <stage>`` under torchrun on this node; node 0 returns the artifact.

    ``while_training`` (node 0) is called right before the launch, after the MLflow run exists: work
    of this process that should overlap the stage (e.g. :func:`rtdmd.pipeline.cards.warm_imports`)."""
    lay = ctx.layout()
    out = lay.stage_dir(stage)
    nproc, backend = ctx.stage_nproc(stage)
    # dotted overrides right after the stage name (the trainer's positional ``overrides``)
    cfg = ctx.params_file()
    args = [stage, *prompt_overrides(ctx, prep, stage), "--config", cfg, "--out", out]
    if init_uri:
        args += ["--init", init_uri]
    if stage == "cold_start" and ctx.cold_start_stop is not None:
        args += ["--max-steps", str(ctx.cold_start_stop)]
    tr = run_id = None
    if node_index == 0:
        tr = ctx.tracker()
        # the trainer's rank-0 logger logs the flattened config (with the overrides below) as params
        run_id = tr.stage_run(ctx.parent_run_id, ctx.logical_run_id, stage, tags={
            **ctx.tags(pathspec, stage), "rtdmd.init_uri": init_uri or "", "rtdmd.world_size": nproc * num_nodes,
            "rtdmd.backend": backend, "rtdmd.stage_dir": out,
            "rtdmd.data_version": (prep or {}).get("data_version")})
        datasets.log_prepared(tr, run_id, prep, "train", datasets.stage_datasets(ctx.params, stage))
    print(f"[rtdmd] {stage}: node {node_index}/{num_nodes}, {nproc} process(es) ({backend}), out {out}", flush=True)
    t0 = time.time()
    if while_training is not None and node_index == 0:
        while_training()
    try:
        L.run_stage("rtdmd.train", args, stage=stage, nproc_per_node=nproc, cwd=str(repo_root()),
                    env=ctx.trainer_env(run_id))  # current.torch.run under @torchrun
    except BaseException:
        if tr is not None:
            tr.finish(run_id, "FAILED")
        raise
    finally:
        shutil.rmtree(Path(cfg).parent, ignore_errors=True)
    if node_index != 0:
        return None
    uri = lay.artifact_uri(stage)
    if stage == "cold_start" and ctx.init_milestone is not None:
        uri = milestone_uri(out, ctx.init_milestone)  # the state RL starts from (and is evaluated)
    manifest = verify_artifact(uri)
    tr.set_tags(run_id, {"rtdmd.artifact_uri": uri, "rtdmd.artifact.config_hash": manifest.get("config_hash"),
                         "rtdmd.artifact.steps": manifest.get("steps")})
    tr.log_metrics(run_id, {"stage_seconds": time.time() - t0})
    _log_stage_files(tr, run_id, out)
    tr.finish(run_id)
    return {"uri": uri, "manifest": {k: v for k, v in manifest.items() if k != "files"},
            "manifest_files": sorted(manifest.get("files", {})), "mlflow_run_id": run_id}


def verify_artifact(uri: str) -> dict:
    """Fetch (S3) / open (local) a published artifact and verify every checksum; returns its manifest."""
    if is_s3(uri):
        path = fetch_dir(uri, cache_dir())
        return read_manifest(path)
    return verify_manifest(uri)


def _log_stage_files(tr: Tracker, run_id: str, out: str) -> None:
    if is_s3(out):
        return
    base = Path(out)
    files = [base / "metrics.jsonl"] + sorted(base.glob("*.png")) + sorted((base / "samples").glob("*.png"))
    try:
        tr.log_files(run_id, [f for f in files if f.is_file()], "stage")
    except Exception as exc:  # noqa: BLE001 - artifacts are a convenience, not a correctness issue
        print(f"[rtdmd] warning: could not log stage files to MLflow: {exc}", file=sys.stderr)
