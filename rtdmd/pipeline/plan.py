"""The flow's ``start`` step: parse the flow parameters, validate them, check the services and
create the MLflow parent run — everything before any training — into one :class:`RunContext`.

Each part raises :class:`~rtdmd.pipeline.preflight.PreflightError` with the flag, key or value at
fault: unknown backbone or stage, params/override typos, batch sizes a world size does not divide,
``compute.*`` overrides on a deployed profile, an init artifact that is missing, incomplete or for
another backbone or stage, an unreachable MLflow server or S3 endpoint.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import yaml

from rtdmd import tracking as T
from rtdmd.artifacts.store import is_s3
from rtdmd.config import params_hash
from rtdmd.config.schema import Params
from rtdmd.config.typed import to_mapping
from rtdmd.pipeline import artifacts as A
from rtdmd.pipeline import launch as L
from rtdmd.pipeline import preflight as P
from rtdmd.pipeline import profiles as PR
from rtdmd.pipeline.context import STAGE_ORDER, RunContext, repo_root, write_text

EVAL_FLAGS_OWNED = ("--config", "--out", "--variant", "--override")  # the flow sets these itself


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


@dataclass
class Request:
    """The flow parameters, parsed (params loaded and type-checked, nothing validated across them yet)."""

    deploy: PR.DeployConfig
    backbone_arg: str
    overrides: list[str]
    params: Params
    stages: list[str]
    eval_args: list[str]
    cold_start_uri: str
    rl_uri: str


def parse_request(*, backbone: str, overrides: str, stages: str, cold_start_uri: str, rl_uri: str,
                  deploy: Mapping[str, Any] | None, eval_args: str = "") -> Request:
    try:
        dep = PR.parse_deploy_config(dict(deploy) if deploy is not None else None)
    except PR.ProfileError as exc:
        raise P.PreflightError(str(exc)) from None
    ovr = parse_overrides(overrides)
    return Request(deploy=dep, backbone_arg=backbone, overrides=ovr, params=P.load_run_params(backbone, ovr),
                   stages=parse_stages(stages), eval_args=shlex.split(eval_args or ""),
                   cold_start_uri=(cold_start_uri or "").strip(), rl_uri=(rl_uri or "").strip())


def validate_request(req: Request) -> tuple[dict[str, PR.StagePlan], dict[str, int], dict[str, dict]]:
    """Cross-checks of the parsed request; returns the stage plans, world sizes and given-artifact manifests."""
    dep, params = req.deploy, req.params
    if dep.profile == "kubernetes":
        if params.name != dep.backbone:
            raise P.PreflightError(
                f"--backbone {req.backbone_arg}: this deployment's pods were rendered for backbone '{dep.backbone}' "
                f"(deploy config); redeploy with --config-value deploy '{{\"profile\": \"kubernetes\", "
                f"\"backbone\": \"{params.name}\"}}'")
        compute = [o for o in req.overrides if o.startswith("compute.") and not o.startswith("compute.local_nproc")]
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

    owned = [a for a in req.eval_args if a.split("=")[0] in EVAL_FLAGS_OWNED]
    if owned:
        raise P.PreflightError(f"--eval-args may not set {', '.join(owned)} (the flow sets them)")
    todo = req.stages
    if req.cold_start_uri and "cold_start" in todo:
        raise P.PreflightError("--cold-start-uri is given but 'cold_start' is also in --stages: drop one of them")
    if req.rl_uri and "rl" in todo:
        raise P.PreflightError("--rl-uri is given but 'rl' is also in --stages: drop one of them")
    if "rl" in todo and "cold_start" not in todo and not req.cold_start_uri:
        raise P.PreflightError("--stages runs rl without cold_start: pass --cold-start-uri <cold-start artifact URI>")
    given = {}
    if req.cold_start_uri:
        given["cold_start"] = P.check_init_artifact(req.cold_start_uri, backbone=params.name,
                                                    expected_stage="cold_start", flag="--cold-start-uri")
    if req.rl_uri:
        given["rl"] = P.check_init_artifact(req.rl_uri, backbone=params.name, expected_stage="rl", flag="--rl-uri")
    return plans, worlds, given


def resolve_services(profile: str, *, check: bool = True) -> tuple[str, str]:
    """``(artifact root, tracking URI)`` for the profile; with ``check``, both are reachable and usable."""
    root = A.default_artifact_root(profile) if check else os.environ.get("RTDMD_ARTIFACT_ROOT", "")
    uri = T.tracking_uri()
    if profile == "kubernetes" and not uri.startswith(("http://", "https://", "databricks")):
        raise P.PreflightError(f"the kubernetes profile needs a shared MLflow server: set MLFLOW_TRACKING_URI to its "
                               f"http(s):// URL (got {uri})")
    if profile == "kubernetes" and not is_s3(root):
        raise P.PreflightError(f"the kubernetes profile needs an s3:// artifact root (RTDMD_ARTIFACT_ROOT), got {root}")
    if check:
        P.check_services(artifact_root=root, tracking_uri=uri)
    return root, uri


def open_parent_run(ctx: RunContext, origin_run_id: str | None) -> str:
    """Write ``<run>/params.yaml`` and create (or, after ``resume``, find) the MLflow parent run."""
    lay = ctx.layout()
    write_text(lay.params_uri(), yaml.safe_dump(ctx.params, sort_keys=False))
    return ctx.tracker().parent_run(ctx.logical_run_id, ctx.flow, {
        "rtdmd.backbone": ctx.backbone, "metaflow.flow": ctx.flow, "metaflow.run_id": ctx.run_id,
        "metaflow.pathspec": ctx.pathspec, "metaflow.origin_run_id": origin_run_id or "",
        "git.commit": ctx.git.get("commit_sha"), "git.dirty": ctx.git.get("has_uncommitted_changes"),
        "rtdmd.params_hash": ctx.params_hash, "rtdmd.profile": ctx.profile, "rtdmd.stages": ",".join(ctx.stages),
        "rtdmd.artifact_root": ctx.artifact_root, "rtdmd.run_dir": lay.base, "rtdmd.overrides": " ".join(ctx.overrides),
        "mlflow.note.content": f"RTDMD flow run {ctx.flow}/{ctx.run_id} ({ctx.backbone}); artifacts under {lay.base}",
    })


def plan_run(*, flow: str, run_id: str, origin_run_id: str | None, backbone: str, overrides: str,
             stages: str, cold_start_uri: str, rl_uri: str, deploy: Mapping[str, Any] | None,
             pathspec: str, eval_args: str = "", skip_services: bool = False,
             full_cold_start: bool = False) -> RunContext:
    """Parse, validate, check services, open the MLflow parent run (raises :class:`PreflightError`).
    ``skip_services`` stops after validation (no service contact, no run created)."""
    req = parse_request(backbone=backbone, overrides=overrides, stages=stages, cold_start_uri=cold_start_uri,
                        rl_uri=rl_uri, deploy=deploy, eval_args=eval_args)
    plans, worlds, given = validate_request(req)
    root, uri = resolve_services(req.deploy.profile, check=not skip_services)
    params = req.params
    ctx = RunContext(
        flow=flow, run_id=str(run_id), logical_run_id=str(origin_run_id or run_id), backbone=params.name,
        backbone_arg=backbone, overrides=req.overrides, stages=req.stages, profile=req.deploy.profile,
        deploy=req.deploy.to_dict(), artifact_root=root, tracking_uri=uri, experiment=T.experiment_name(params.name),
        params=to_mapping(params), params_hash=params_hash(params), plans=plans, world_sizes=worlds,
        given={"cold_start": req.cold_start_uri or None, "rl": req.rl_uri or None}, given_manifests=given,
        eval_args=req.eval_args, git=T.git_info(repo_root()), pathspec=pathspec)
    ctx.init_milestone = params.rl.init_milestone
    if ctx.init_milestone is not None and {"cold_start", "rl"} <= set(ctx.stages) and not full_cold_start:
        ctx.cold_start_stop = ctx.init_milestone  # run the cold start only as far as RL needs
    given_cs = given.get("cold_start")
    if ctx.init_milestone is not None and given_cs is not None:
        step = given_cs.get("milestone", given_cs.get("steps"))
        if step != ctx.init_milestone:
            raise P.PreflightError(
                f"--cold-start-uri {req.cold_start_uri} is the cold-start state at step {step}, but rl.init_milestone "
                f"is {ctx.init_milestone}; give <cold-start out>/milestones/step-{ctx.init_milestone} or override "
                f"rl.init_milestone=null")
    if not skip_services:
        ctx.parent_run_id = open_parent_run(ctx, origin_run_id)
    return ctx


def describe_plan(ctx: RunContext) -> str:
    lay = ctx.layout()
    lines = [f"RTDMD plan — {ctx.flow} run {ctx.run_id} (logical run {ctx.logical_run_id})",
             f"  backbone   : {ctx.backbone}   profile: {ctx.profile}   stages: {', '.join(ctx.stages)}",
             f"  overrides  : {' '.join(ctx.overrides) or '(none)'}",
             f"  params hash: {ctx.params_hash[:16]}",
             f"  artifacts  : {lay.base}",
             f"  MLflow     : {ctx.tracking_uri}  experiment '{ctx.experiment}'  parent run {ctx.parent_run_id}"]
    for stage, plan in ctx.plans.items():
        lines.append(f"  {plan.describe()} (world size {ctx.world_sizes[stage]})")
    total = ctx.params["cold_start"]["total_steps"]
    if ctx.cold_start_stop is not None:
        lines.append(f"  cold start : runs to step {ctx.cold_start_stop} of {total} — the milestone RL starts from "
                     f"(rl.init_milestone); --full-cold-start true runs the whole schedule")
    elif ctx.init_milestone is not None and "cold_start" in ctx.stages:
        lines.append(f"  cold start : all {total} steps (--full-cold-start true); RL starts from the step-"
                     f"{ctx.init_milestone} milestone")
    for k, v in ctx.given.items():
        if v:
            lines.append(f"  given {k} artifact: {v}")
    return "\n".join(lines)
