"""What each flow step does (the flow file only orchestrates and calls these).

Every function takes the run context ``ctx`` built by :func:`plan_run` in ``start`` (a plain
dict, stored as a Metaflow artifact and therefore cloned by ``resume``) and returns plain
dicts (URIs, manifests, metrics) — tensors never enter Metaflow.

Stage outputs live under the artifact root keyed by the *logical* run (see
:mod:`rtdmd.pipeline.artifacts`), so a ``@retry`` attempt or a ``resume``-d run re-launches the
trainer with the same ``--out`` and it continues from its latest complete checkpoint.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from rtdmd.artifacts.store import fetch_dir, is_s3, publish_dir, s3_client, split_s3
from rtdmd.pipeline import artifacts as A
from rtdmd.pipeline import launch as L
from rtdmd.pipeline import preflight as P
from rtdmd.pipeline import profiles as PR
from rtdmd.pipeline import tracking as T
from rtdmd.pipeline.errors import PipelineError

STAGE_ORDER = ("prep", "cold_start", "rl", "eval")
REGISTRY_HOOK = ("rtdmd.registry.flow", "register_from_flow")
BUILTIN_DATASETS = ("toy2d",)  # = rtdmd.eval.prompts.BUILTIN_DATASETS (not imported: it pulls in torch)


class StageError(PipelineError):
    """A flow stage failed; the message says which and why."""

    headline = "RTDMD stage failed"


# ----------------------------------------------------------------------------- helpers
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


def parse_stages(text: str | Sequence[str]) -> list[str]:
    items = text if not isinstance(text, str) else [s.strip() for s in text.replace(" ", ",").split(",")]
    items = [s for s in items if s]
    if not items or items == ["all"]:
        return list(STAGE_ORDER)
    bad = [s for s in items if s not in STAGE_ORDER]
    if bad:
        raise P.PreflightError(f"--stages: unknown stage(s) {', '.join(bad)}; choose from {', '.join(STAGE_ORDER)} (or 'all')")
    return [s for s in STAGE_ORDER if s in items]


def parse_overrides(text: str | Sequence[str]) -> list[str]:
    items = shlex.split(text) if isinstance(text, str) else list(text)
    for item in items:
        if "=" not in item:
            raise P.PreflightError(f"--overrides: {item!r} must look like key.path=value")
    return items


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def write_text(uri: str, text: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=text.encode())
    else:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        Path(uri).write_text(text)


def params_file(ctx: Mapping[str, Any]) -> str:
    """The run's resolved params as a local YAML file for ``--config`` (what start validated)."""
    d = Path(tempfile.mkdtemp(prefix="rtdmd-params-"))
    path = d / f"{ctx['backbone']}.yaml"
    path.write_text(yaml.safe_dump(ctx["params"], sort_keys=False))
    return str(path)


def layout(ctx: Mapping[str, Any]) -> A.RunLayout:
    return A.RunLayout(ctx["artifact_root"], ctx["flow"], ctx["logical_run_id"])


def tracker(ctx: Mapping[str, Any]) -> T.Tracker:
    return T.Tracker(ctx["tracking_uri"], ctx["experiment"])


def stage_nproc(ctx: Mapping[str, Any], stage: str) -> tuple[int, str]:
    """``(nproc_per_node, backend)`` of a stage on this node."""
    plan = ctx["plans"][stage]
    if plan["nproc_per_node"] is not None:  # kubernetes: GPUs per node
        return int(plan["nproc_per_node"]), "nccl" if plan["gpus_per_node"] else "gloo"
    if stage == "eval":
        gpus = L.visible_gpus()
        return (gpus, "nccl") if gpus else (1, "gloo")
    return L.local_nproc(ctx["params"]["compute"]["local_nproc"])


def _trainer_env(ctx: Mapping[str, Any], mlflow_run_id: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("MLFLOW_RUN_ID", None)
    if mlflow_run_id:
        env["MLFLOW_TRACKING_URI"] = ctx["tracking_uri"]
        env["MLFLOW_RUN_ID"] = mlflow_run_id
    else:  # non-zero nodes never log
        env.pop("MLFLOW_TRACKING_URI", None)
    return env


# ----------------------------------------------------------------------------- start
def plan_run(*, flow: str, run_id: str, origin_run_id: str | None, backbone: str, overrides: str,
             stages: str, cold_start_uri: str, rl_uri: str, deploy: Mapping[str, Any] | None,
             pathspec: str, eval_args: str = "", skip_services: bool = False) -> dict[str, Any]:
    """Resolve and validate everything before any training (raises :class:`PreflightError`)."""
    from rtdmd.config import params_hash
    from rtdmd.config.typed import to_mapping

    try:
        dep = PR.parse_deploy_config(dict(deploy) if deploy is not None else None)
    except PR.ProfileError as exc:
        raise P.PreflightError(str(exc)) from None
    ovr = parse_overrides(overrides)
    params = P.load_run_params(backbone, ovr)
    if dep.profile == "kubernetes":
        if params.name != dep.backbone:
            raise P.PreflightError(
                f"--backbone {backbone}: this deployment's pods were rendered for backbone '{dep.backbone}' "
                f"(deploy config); redeploy with --config-value deploy '{{\"profile\": \"kubernetes\", "
                f"\"backbone\": \"{params.name}\"}}'")
        compute = [o for o in ovr if o.startswith("compute.") and not o.startswith("compute.local_nproc")]
        if compute:
            raise P.PreflightError(
                f"--overrides {' '.join(compute)}: compute.* sets decorators, which are fixed at deploy time; "
                "put these in the deploy config's 'overrides' instead")
        render = PR.render_params(dep)
    else:
        render = params
    try:
        plans = PR.stage_plans(dep, render)
    except PR.ProfileError as exc:
        raise P.PreflightError(str(exc)) from None
    worlds = {}
    for stage, plan in plans.items():
        if plan.nproc_per_node is None:
            n, _ = L.local_nproc(params.compute.local_nproc) if stage != "eval" else (1, "gloo")
            worlds[stage] = n
        else:
            worlds[stage] = plan.nodes * plan.nproc_per_node
    P.check_world_sizes(params, worlds)

    todo = parse_stages(stages)
    extra_eval = shlex.split(eval_args or "")
    owned = [a for a in extra_eval if a.split("=")[0] in ("--config", "--out", "--variant", "--override")]
    if owned:
        raise P.PreflightError(f"--eval-args may not set {', '.join(owned)} (the flow sets them)")
    cold_start_uri, rl_uri = (cold_start_uri or "").strip(), (rl_uri or "").strip()
    if cold_start_uri and "cold_start" in todo:
        raise P.PreflightError("--cold-start-uri is given but 'cold_start' is also in --stages: drop one of them")
    if rl_uri and "rl" in todo:
        raise P.PreflightError("--rl-uri is given but 'rl' is also in --stages: drop one of them")
    if "rl" in todo and "cold_start" not in todo and not cold_start_uri:
        raise P.PreflightError("--stages runs rl without cold_start: pass --cold-start-uri <cold-start artifact URI>")
    given = {}
    if cold_start_uri:
        given["cold_start"] = P.check_init_artifact(cold_start_uri, backbone=params.name, expected_stage="cold_start",
                                                    flag="--cold-start-uri")
    if rl_uri:
        given["rl"] = P.check_init_artifact(rl_uri, backbone=params.name, expected_stage="rl", flag="--rl-uri")

    root = A.default_artifact_root(dep.profile) if not skip_services else os.environ.get("RTDMD_ARTIFACT_ROOT", "")
    uri = T.tracking_uri()
    if dep.profile == "kubernetes" and not uri.startswith(("http://", "https://", "databricks")):
        raise P.PreflightError(f"the kubernetes profile needs a shared MLflow server: set MLFLOW_TRACKING_URI to its "
                               f"http(s):// URL (got {uri})")
    if dep.profile == "kubernetes" and not is_s3(root):
        raise P.PreflightError(f"the kubernetes profile needs an s3:// artifact root (RTDMD_ARTIFACT_ROOT), got {root}")
    if not skip_services:
        P.check_services(artifact_root=root, tracking_uri=uri)

    logical = str(origin_run_id or run_id)
    mapping = to_mapping(params)
    ctx: dict[str, Any] = {
        "flow": flow, "run_id": str(run_id), "logical_run_id": logical, "backbone": params.name,
        "backbone_arg": backbone, "overrides": ovr, "stages": todo, "profile": dep.profile,
        "deploy": dep.to_dict(), "artifact_root": root, "tracking_uri": uri,
        "experiment": T.experiment_name(params.name), "params": mapping, "params_hash": params_hash(params),
        "plans": {k: vars(v) for k, v in plans.items()}, "world_sizes": worlds,
        "given": {"cold_start": cold_start_uri or None, "rl": rl_uri or None}, "given_manifests": given,
        "eval_args": extra_eval,
        "git": T.git_info(repo_root()), "pathspec": pathspec,
    }
    if skip_services:
        return ctx
    lay = layout(ctx)
    write_text(lay.params_uri(), yaml.safe_dump(mapping, sort_keys=False))
    tr = tracker(ctx)
    ctx["parent_run_id"] = tr.parent_run(logical, flow, {
        "rtdmd.backbone": params.name, "metaflow.flow": flow, "metaflow.run_id": run_id,
        "metaflow.pathspec": pathspec, "metaflow.origin_run_id": origin_run_id or "",
        "git.commit": ctx["git"].get("commit_sha"), "git.dirty": ctx["git"].get("has_uncommitted_changes"),
        "rtdmd.params_hash": ctx["params_hash"], "rtdmd.profile": dep.profile, "rtdmd.stages": ",".join(todo),
        "rtdmd.artifact_root": root, "rtdmd.run_dir": lay.base, "rtdmd.overrides": " ".join(ovr),
        "mlflow.note.content": f"RTDMD flow run {flow}/{run_id} ({params.name}); artifacts under {lay.base}",
    })
    return ctx


def describe_plan(ctx: Mapping[str, Any]) -> str:
    lay = layout(ctx)
    lines = [f"RTDMD plan — {ctx['flow']} run {ctx['run_id']} (logical run {ctx['logical_run_id']})",
             f"  backbone   : {ctx['backbone']}   profile: {ctx['profile']}   stages: {', '.join(ctx['stages'])}",
             f"  overrides  : {' '.join(ctx['overrides']) or '(none)'}",
             f"  params hash: {ctx['params_hash'][:16]}",
             f"  artifacts  : {lay.base}",
             f"  MLflow     : {ctx['tracking_uri']}  experiment '{ctx['experiment']}'  parent run {ctx.get('parent_run_id')}"]
    for stage, plan in ctx["plans"].items():
        p = PR.StagePlan(**plan)
        extra = f" (world size {ctx['world_sizes'][stage]})"
        lines.append(f"  {p.describe()}{extra}")
    for k, v in ctx["given"].items():
        if v:
            lines.append(f"  given {k} artifact: {v}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- prep
def ensure_model_assets(ctx: Mapping[str, Any]) -> list[str]:
    """Locally built models the trainers load (``model.tiny``): the toy2d teacher (trained and
    cached, like the DVC stage ``toy2d_teacher``) or a tiny random-weight pipeline. Built once here
    so the torchrun ranks never race to create them. Returns what was built."""
    model = ctx["params"]["model"]
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


def run_prep(ctx: Mapping[str, Any], pathspec: str) -> dict[str, Any]:
    """Prepare + validate the prompt sets, publish them under ``<run>/prep``; record the data version."""
    lay = layout(ctx)
    root = repo_root()
    data_params = os.environ.get("RTDMD_DATA_PARAMS") or str(root / "params" / "data.yaml")
    tr = tracker(ctx)
    run_id = tr.stage_run(ctx["parent_run_id"], ctx["logical_run_id"], "prep",
                          tags=_tags(ctx, pathspec, "prep"), params={"data_params": data_params})
    try:
        with tempfile.TemporaryDirectory(prefix="rtdmd-prep-") as tmp:
            out = Path(tmp) / "prompts"
            cmd = [sys.executable, "-m", "rtdmd.data.prepare", "--out", str(out), "--params", data_params]
            print(f"[rtdmd] prep: {' '.join(cmd)}", flush=True)
            res = subprocess.run(cmd, cwd=str(root), capture_output=True, text=True)
            sys.stdout.write(res.stdout)
            sys.stderr.write(res.stderr)
            if res.returncode != 0:
                lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
                msg = "; ".join(lines[-6:]) or f"exit code {res.returncode}"
                raise StageError(f"prompt prep failed (python -m rtdmd.data.prepare, exit {res.returncode}): {msg}")
            manifest = json.loads((out / "manifest.json").read_text())
            fields = {"kind": "rtdmd-prompts", "data_version": manifest.get("data_version"),
                      "counts": manifest.get("counts"), "validation": manifest.get("validation")}
            publish_dir(tmp, lay.artifact_uri("prep"), fields)
        dvc = None
        try:
            from rtdmd.data.dvc_access import data_version

            dvc = data_version(str(root / "data" / "prompts"), repo=root)
        except Exception as exc:  # noqa: BLE001 - not tracked (no dvc.lock yet) is fine
            dvc = {"error": str(exc)[:300]}
        info = {"uri": lay.artifact_uri("prep"), "data_version": manifest.get("data_version"),
                "counts": manifest.get("counts", {}), "dvc": dvc}
        tr.set_tags(run_id, {"rtdmd.data_version": info["data_version"], "rtdmd.artifact_uri": info["uri"],
                             "rtdmd.dvc.commit": (dvc or {}).get("commit"), "rtdmd.dvc.md5": (dvc or {}).get("md5")})
        tr.set_tags(ctx["parent_run_id"], {"rtdmd.data_version": info["data_version"]})
        totals: dict[str, float] = {}
        for ds, splits in info["counts"].items():
            for split, n in splits.items():
                totals[f"prompts.{ds}.{split}"] = n
        tr.log_metrics(run_id, totals)
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
        from rtdmd.artifacts.fs import verify_manifest

        verify_manifest(path)
    return path / "prompts"


def prompt_overrides(ctx: Mapping[str, Any], prep: Mapping[str, Any] | None, stage: str) -> list[str]:
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
        name = Path(_get(ctx["params"], key)).name
        if counts.get(name, {}).get("train", 0) > 0:
            out.append(f"{key}={local / name}")
    elif stage == "eval":
        needed = set(ctx["params"]["eval"]["reward_dataset_map"].values())
        if needed and all(counts.get(ds, {}).get("test", 0) > 0 or ds in BUILTIN_DATASETS for ds in needed):
            out.append(f"eval.datasets_root={local}")
    return out


def _run_of(pathspec: str, ctx: Mapping[str, Any]) -> str:
    """Run id of a task pathspec ``Flow/run/step/task`` (the *current* run, also after ``resume``)."""
    parts = str(pathspec).split("/")
    return parts[1] if len(parts) > 1 else ctx["run_id"]


def _tags(ctx: Mapping[str, Any], pathspec: str, stage: str) -> dict[str, Any]:
    return {"rtdmd.backbone": ctx["backbone"], "metaflow.flow": ctx["flow"], "metaflow.run_id": _run_of(pathspec, ctx),
            "metaflow.pathspec": pathspec, "git.commit": ctx["git"].get("commit_sha"),
            "rtdmd.params_hash": ctx["params_hash"], "rtdmd.stage": stage}


# ----------------------------------------------------------------------------- training
def run_training(ctx: Mapping[str, Any], stage: str, *, init_uri: str | None, prep: Mapping[str, Any] | None,
                 pathspec: str, node_index: int = 0, num_nodes: int = 1) -> dict[str, Any] | None:
    """Launch ``rtdmd.train <stage>`` under torchrun on this node; node 0 returns the artifact."""
    lay = layout(ctx)
    out = lay.stage_dir(stage)
    nproc, backend = stage_nproc(ctx, stage)
    # dotted overrides right after the stage name (the trainer's positional ``overrides``)
    cfg = params_file(ctx)
    args = [stage, *prompt_overrides(ctx, prep, stage), "--config", cfg, "--out", out]
    if init_uri:
        args += ["--init", init_uri]
    tr = run_id = None
    if node_index == 0:
        tr = tracker(ctx)
        # the trainer's rank-0 logger logs the flattened config (with the overrides below) as params
        run_id = tr.stage_run(ctx["parent_run_id"], ctx["logical_run_id"], stage, tags={
            **_tags(ctx, pathspec, stage), "rtdmd.init_uri": init_uri or "", "rtdmd.world_size": nproc * num_nodes,
            "rtdmd.backend": backend, "rtdmd.stage_dir": out,
            "rtdmd.data_version": (prep or {}).get("data_version")})
    print(f"[rtdmd] {stage}: node {node_index}/{num_nodes}, {nproc} process(es) ({backend}), out {out}", flush=True)
    t0 = time.time()
    try:
        L.run_stage("rtdmd.train", args, stage=stage, nproc_per_node=nproc, cwd=str(repo_root()),
                    env=_trainer_env(ctx, run_id), multinode=num_nodes > 1 if num_nodes else None)
    except BaseException:
        if tr is not None:
            tr.finish(run_id, "FAILED")
        raise
    finally:
        shutil.rmtree(Path(cfg).parent, ignore_errors=True)
    if node_index != 0:
        return None
    uri = lay.artifact_uri(stage)
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
    from rtdmd.artifacts.fs import read_manifest, verify_manifest

    if is_s3(uri):
        path = fetch_dir(uri, cache_dir())
        return read_manifest(path)
    return verify_manifest(uri)


def _log_stage_files(tr: T.Tracker, run_id: str, out: str) -> None:
    if is_s3(out):
        return
    base = Path(out)
    files = [base / "metrics.jsonl"] + sorted(base.glob("*.png")) + sorted((base / "samples").glob("*.png"))
    try:
        tr.log_files(run_id, [f for f in files if f.is_file()], "stage")
    except Exception as exc:  # noqa: BLE001 - artifacts are a convenience, not a correctness issue
        print(f"[rtdmd] warning: could not log stage files to MLflow: {exc}", file=sys.stderr)


# ----------------------------------------------------------------------------- evaluation
def eval_variants(ctx: Mapping[str, Any], cold_start_uri: str | None, rl_uri: str | None) -> list[dict[str, str]]:
    """The matrix rows: teacher at its full NFE and at the student's NFE, cold start, cold start + RL."""
    p = ctx["params"]
    k = len(p["sampler"]["step_list"])
    n = int(p["eval"]["teacher_steps"])
    out = [{"name": f"teacher-{n}", "spec": f"teacher:steps={n}", "role": "teacher"}]
    if k != n:
        out.append({"name": f"teacher-{k}", "spec": f"teacher:steps={k}", "role": "teacher_few_step"})
    if cold_start_uri:
        out.append({"name": f"cold_start-{k}", "spec": f"lora:{cold_start_uri}", "role": "cold_start",
                    "artifact_uri": cold_start_uri})
    if rl_uri:
        out.append({"name": f"rtdmd-{k}", "spec": f"lora:{rl_uri}", "role": "rtdmd", "artifact_uri": rl_uri})
    return out


def run_eval_variant(ctx: Mapping[str, Any], variant: Mapping[str, str], *, prep: Mapping[str, Any] | None,
                     pathspec: str) -> dict[str, Any]:
    """``python -m rtdmd.eval`` for one variant (its MLflow run is written by :func:`merge_eval`,
    so this step imports neither torch nor MLflow)."""
    lay = layout(ctx)
    dest = lay.eval_dir(variant["name"])
    local = Path(tempfile.mkdtemp(prefix="rtdmd-eval-")) / variant["name"] if is_s3(dest) else Path(dest)
    if local.exists():
        shutil.rmtree(local)  # a retried/resumed evaluation starts clean (it is deterministic)
    nproc, _ = stage_nproc(ctx, "eval")
    cfg = params_file(ctx)
    args = ["--config", cfg, "--variant", f"{variant['name']}={variant['spec']}", "--out", str(local),
            *ctx.get("eval_args", [])]
    ovr = prompt_overrides(ctx, prep, "eval")
    if ovr:
        args += ["--override", *ovr]
    t0 = time.time()
    try:
        L.run_stage("rtdmd.eval", args, stage=f"eval:{variant['name']}", nproc_per_node=nproc, cwd=str(repo_root()),
                    env=_trainer_env(ctx, None), multinode=False)
    finally:
        shutil.rmtree(Path(cfg).parent, ignore_errors=True)
    summary = json.loads((local / "metadata.json").read_text())
    summary.pop("config", None)
    if is_s3(dest):
        publish_dir(local, dest, {"kind": "rtdmd-eval", "variant": variant["name"]})
        shutil.rmtree(local.parent, ignore_errors=True)
    return {**dict(variant), "uri": dest, "summary": summary, "pathspec": pathspec, "seconds": time.time() - t0}


def merge_eval(ctx: Mapping[str, Any], results: Sequence[Mapping[str, Any]], order: Sequence[str]) -> dict[str, Any]:
    """Join the per-variant evaluations: the matrix (JSON/CSV/Markdown) under ``<run>/eval/matrix``,
    one MLflow run per variant (a metric per reward) and the table on the parent run."""
    from rtdmd.eval import report

    by_name = {r["name"]: r for r in results}
    names = [n for n in order if n in by_name]
    if not names:
        raise StageError("evaluation produced no variant results")
    first = by_name[names[0]]["summary"]
    combined = {k: v for k, v in first.items() if k not in ("variants", "scores", "files", "num_images",
                                                              "time_seconds_sum")}
    combined["variants"] = {n: by_name[n]["summary"]["variants"][n] for n in names}
    combined["scores"] = {n: combined["variants"][n]["scores"] for n in names}
    _, rows = report.table_rows(combined)
    md = report.markdown(combined)
    lay = layout(ctx)
    tr = tracker(ctx)
    run_ids = {}
    for run in report.mlflow_runs(combined):
        name = run["params"]["variant"]
        res = by_name[name]
        run_id = tr.eval_run(ctx["parent_run_id"], ctx["logical_run_id"], name, tags={
            **_tags(ctx, res["pathspec"], "eval"), **run["tags"], "rtdmd.eval.role": res.get("role"),
            "rtdmd.artifact_uri": res.get("artifact_uri"), "rtdmd.eval_dir": res["uri"]})
        try:
            tr.log_params(run_id, run["params"])
        except Exception:  # noqa: BLE001 - identical params already logged by an earlier attempt
            pass
        tr.log_metrics(run_id, {**run["metrics"], "eval_seconds": res.get("seconds", 0.0)})
        vdir = _local_eval_dir(res["uri"], name)
        if vdir is not None:
            files = [vdir / "metadata.json", *sorted(vdir.glob("grid_*.png"))]
            tr.log_files(run_id, [f for f in files if f.is_file()], "eval")
            # the fixed-seed sample grid of a trained stage also goes to that stage's run
            stage = {"cold_start": "cold_start", "rtdmd": "rl"}.get(res.get("role") or "")
            stage_run = tr.find_stage_run(ctx["logical_run_id"], stage) if stage else None
            if stage_run:
                tr.log_files(stage_run, sorted(vdir.glob("grid_*.png")), "samples")
        tr.finish(run_id)
        run_ids[name] = run_id
    with tempfile.TemporaryDirectory(prefix="rtdmd-matrix-") as tmp:
        t = Path(tmp)
        (t / "matrix.json").write_text(json.dumps(combined, indent=2, default=str))
        report.write_csv(t / "table.csv", combined)
        (t / "table.md").write_text(md + "\n")
        uri = lay.eval_dir("matrix")
        publish_dir(t, uri, {"kind": "rtdmd-eval-matrix", "variants": names})
        tr.log_table(ctx["parent_run_id"], rows, "eval/matrix.json")
        tr.log_text(ctx["parent_run_id"], md, "eval/matrix.md")
        tr.log_files(ctx["parent_run_id"], [t / "table.csv"], "eval")
        tr.set_tags(ctx["parent_run_id"], {"rtdmd.eval_matrix_uri": uri,
                                           "rtdmd.eval_runs": ",".join(run_ids[n] for n in names if n in run_ids)})
    return {"uri": uri, "rows": rows, "markdown": md, "scores": combined["scores"], "mlflow_runs": run_ids,
            "training_rewards": combined.get("training_rewards", []), "held_out_rewards": combined.get("held_out_rewards", [])}


def _local_eval_dir(uri: str, name: str) -> Path | None:
    """The variant's own output directory (``<eval dir>/<variant>``), fetched when on S3."""
    try:
        base = fetch_dir(uri, cache_dir()) if is_s3(uri) else Path(uri)
    except Exception as exc:  # noqa: BLE001 - files are a convenience for the MLflow UI
        print(f"[rtdmd] warning: cannot fetch {uri} for MLflow: {exc}", file=sys.stderr)
        return None
    d = base / name
    return d if d.is_dir() else None


# ----------------------------------------------------------------------------- register
def register(ctx: Mapping[str, Any], *, final: Mapping[str, Any] | None, cold_start: Mapping[str, Any] | None,
             matrix: Mapping[str, Any] | None, pathspec: str) -> dict[str, Any]:
    """Record the final artifact + evaluation summary on the parent run; call the registry hook.

    Hook for issue 8: if ``rtdmd.registry.flow.register_from_flow`` exists it is called with
    keyword arguments ``backbone, artifact_uri, manifest, cold_start_uri, eval_summary,
    parent_run_id, tracking_uri, experiment, pathspec, params`` and its returned dict is recorded here.
    """
    tr = tracker(ctx)
    parent = ctx["parent_run_id"]
    tags = {"metaflow.pathspec": pathspec, "metaflow.run_id": _run_of(pathspec, ctx)}
    summary: dict[str, Any] = {"backbone": ctx["backbone"], "logical_run_id": ctx["logical_run_id"]}
    if final:
        tags.update({"rtdmd.final_artifact_uri": final["uri"], "rtdmd.final_stage": final["manifest"].get("stage")})
        summary["final_artifact"] = {"uri": final["uri"], "manifest": final["manifest"]}
    if cold_start:
        tags["rtdmd.cold_start_artifact_uri"] = cold_start["uri"]
    if matrix:
        summary["eval"] = {"uri": matrix["uri"], "scores": matrix["scores"],
                           "training_rewards": matrix["training_rewards"], "held_out_rewards": matrix["held_out_rewards"]}
        flat = {}
        for variant, scores in matrix["scores"].items():
            for k, v in scores.items():
                if isinstance(v, (int, float)):
                    flat[f"eval.{variant}.{k}"] = float(v)
        tr.log_metrics(parent, flat)
    registry: dict[str, Any] | None = None
    try:
        import importlib

        mod = importlib.import_module(REGISTRY_HOOK[0])
        hook = getattr(mod, REGISTRY_HOOK[1], None)
    except ImportError:
        hook = None
    if hook is not None and final:
        registry = hook(backbone=ctx["backbone"], artifact_uri=final["uri"], manifest=final["manifest"],
                        cold_start_uri=(cold_start or {}).get("uri"), eval_summary=summary.get("eval"),
                        parent_run_id=parent, tracking_uri=ctx["tracking_uri"], experiment=ctx["experiment"],
                        pathspec=pathspec, params=ctx["params"])
        summary["registry"] = registry
    tr.set_tags(parent, tags)
    tr.log_text(parent, json.dumps(summary, indent=2, default=str), "summary.json")
    tr.finish(parent)
    return summary


def where_to_look(ctx: Mapping[str, Any], matrix: Mapping[str, Any] | None) -> str:
    lay = layout(ctx)
    uri = ctx["tracking_uri"]
    lines = ["", "Where to look:",
             f"  artifacts : {lay.base}",
             f"  MLflow    : mlflow ui --backend-store-uri '{uri}' --host 127.0.0.1 --port 5000 --workers 1"
             if uri.startswith("sqlite") else f"  MLflow    : {uri}",
             f"              experiment '{ctx['experiment']}', parent run {ctx.get('parent_run_id')}"]
    if matrix:
        lines.append(f"  eval table: {matrix['uri']}/table.md")
        lines += ["", matrix["markdown"]]
    return "\n".join(lines)
