"""Compute profiles: which decorators each flow step gets, chosen by configuration.

The profile is part of the flow's ``deploy`` **Config** (a Metaflow ``Config``: resolved once,
before a run or a deployment starts, and frozen into it), never by editing the flow::

    python flows/rtdmd_flow.py run --backbone toy2d                                   # local (default)
    python flows/rtdmd_flow.py --config-value deploy '{"profile": "kubernetes", "backbone": "flux2_4b"}' \\
        argo-workflows create
    python flows/rtdmd_flow.py --config deploy flows/deploy/kubernetes_flux2_4b.json run ...

Without ``--config``/``--config-value`` the Config defaults to ``RTDMD_PROFILE`` /
``RTDMD_BACKBONE`` from the environment (``local`` / ``toy2d`` when unset).

Why a Config and not a Parameter: decorators (``@kubernetes`` GPUs, ``@torchrun`` nodes,
``@retry``) are fixed before the first step runs, so the values they are rendered from —
the profile, the backbone and any ``compute.*`` overrides — must be known then. The flow's
``--backbone`` *Parameter* defaults to the Config's backbone; on the kubernetes profile
``start`` refuses a run whose backbone differs from the one the resources were rendered for.

Deploy config keys (unknown keys are errors)::

    profile:    local | kubernetes
    backbone:   params/<backbone>.yaml the resources/retries/image are rendered from
    overrides:  ["compute.rl.nodes=4", ...]  params overrides applied when rendering
    retries:    null | int     (null: compute.<stage>.retries from params, every profile)
    kubernetes: {...}          extra @kubernetes arguments for every step (namespace,
                               service_account, secrets, node_selector, tolerations, ...)
    forward_env: [NAME, ...]   environment variables whose deploy-time values are set in
                               every step's container (kubernetes profile); default
                               MLFLOW_TRACKING_URI, RTDMD_ARTIFACT_ROOT, MLFLOW_EXPERIMENT_NAME
    light:      {cpu: 2, memory_gb: 8}   resources of the non-training steps (kubernetes)

Profiles:

* ``local`` — the embedded default. Training steps carry plain ``@parallel`` with one node
  (so the graph is the same as on a cluster) and run torchrun on this machine: one process per
  visible GPU with NCCL, else ``compute.local_nproc`` CPU processes with gloo. ``@retry`` from
  params, no pause between attempts.
* ``kubernetes`` — needs the S3 datastore. ``cold_start`` / ``rl`` get ``@torchrun`` with
  ``nproc_per_node = gpus_per_node`` plus ``@kubernetes`` (gpu, cpu, memory, shared_memory,
  image, port) and run as a JobSet of ``compute.<stage>.nodes`` pods; ``eval_variant`` gets
  ``@kubernetes`` with the eval resources (one pod per variant); light steps get a small pod
  with the same image.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from rtdmd.config import load_params

PROFILES = ("local", "kubernetes")
TRAIN_STEPS = {"cold_start": "cold_start", "rl": "rl"}  # flow step -> params stage
EVAL_STEP = "eval_variant"
TORCHRUN_PORT = 3339
DEFAULT_FORWARD_ENV = ("MLFLOW_TRACKING_URI", "RTDMD_ARTIFACT_ROOT", "MLFLOW_EXPERIMENT_NAME")
_KEYS = {"profile", "backbone", "overrides", "retries", "kubernetes", "forward_env", "light"}


class ProfileError(ValueError):
    """The deploy config or the compute section of the params cannot be rendered."""


@dataclass
class DeployConfig:
    profile: str = "local"
    backbone: str = "toy2d"
    overrides: list[str] = field(default_factory=list)
    retries: Optional[int] = None
    kubernetes: dict[str, Any] = field(default_factory=dict)
    forward_env: list[str] = field(default_factory=lambda: list(DEFAULT_FORWARD_ENV))
    light: dict[str, Any] = field(default_factory=lambda: {"cpu": 2, "memory_gb": 8})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_deploy_config(ctx: Any = None) -> dict[str, Any]:
    """Default of the flow's ``deploy`` Config: ``RTDMD_PROFILE`` / ``RTDMD_BACKBONE`` or local/toy2d."""
    return {
        "profile": os.environ.get("RTDMD_PROFILE", "local") or "local",
        "backbone": os.environ.get("RTDMD_BACKBONE", "toy2d") or "toy2d",
    }


def parse_deploy_config(value: Mapping[str, Any] | str | None) -> DeployConfig:
    """Validate the ``deploy`` Config (a mapping, or its JSON text)."""
    if value is None:
        value = default_deploy_config()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"deploy config is not valid JSON: {exc}") from None
    raw = dict(value)
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ProfileError(f"deploy config: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(_KEYS))}")
    cfg = DeployConfig()
    defaults = default_deploy_config()
    cfg.profile = str(raw.get("profile") or defaults["profile"])
    cfg.backbone = str(raw.get("backbone") or defaults["backbone"])
    if cfg.profile not in PROFILES:
        raise ProfileError(f"deploy config: unknown profile '{cfg.profile}'; valid profiles: {', '.join(PROFILES)}")
    overrides = raw.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    if not isinstance(overrides, (list, tuple)) or not all(isinstance(o, str) for o in overrides):
        raise ProfileError("deploy config: 'overrides' must be a list of key=value strings")
    cfg.overrides = list(overrides)
    retries = raw.get("retries")
    if retries is not None and (not isinstance(retries, int) or isinstance(retries, bool) or retries < 0):
        raise ProfileError(f"deploy config: 'retries' must be null or an int >= 0, got {retries!r}")
    cfg.retries = retries
    for key in ("kubernetes", "light"):
        if key in raw and raw[key] is not None:
            if not isinstance(raw[key], Mapping):
                raise ProfileError(f"deploy config: '{key}' must be a mapping")
            setattr(cfg, key, {**getattr(cfg, key), **dict(raw[key])})
    if raw.get("forward_env") is not None:
        cfg.forward_env = [str(v) for v in raw["forward_env"]]
    return cfg


@dataclass
class StagePlan:
    """How one stage runs under a profile (the numbers decorators are rendered from)."""

    stage: str
    nodes: int
    gpus_per_node: int
    nproc_per_node: Optional[int]  # None on the local profile: decided on the machine at run time
    cpu: int
    memory_mb: int
    shared_memory_mb: int
    retries: int
    image: str

    def describe(self) -> str:
        if self.nproc_per_node is None:
            return f"{self.stage}: 1 node, torchrun over local GPUs (else CPU/gloo processes), retries {self.retries}"
        return (f"{self.stage}: {self.nodes} node(s) x {self.gpus_per_node} GPU(s), nproc_per_node "
                f"{self.nproc_per_node}, cpu {self.cpu}, memory {self.memory_mb} MB, /dev/shm "
                f"{self.shared_memory_mb} MB, retries {self.retries}, image {self.image}")


def render_params(deploy: DeployConfig):
    """The params the decorators are rendered from (the deploy backbone + deploy overrides)."""
    try:
        return load_params(deploy.backbone, deploy.overrides)
    except Exception as exc:
        raise ProfileError(f"deploy config: cannot load params for backbone '{deploy.backbone}': {exc}") from None


def stage_plans(deploy: DeployConfig, params=None) -> dict[str, StagePlan]:
    """One :class:`StagePlan` per stage (``cold_start``, ``rl``, ``eval``)."""
    params = params if params is not None else render_params(deploy)
    plans = {}
    for stage in ("cold_start", "rl", "eval"):
        res = getattr(params.compute, stage)
        retries = deploy.retries if deploy.retries is not None else int(res.retries)
        if deploy.profile == "local":
            plans[stage] = StagePlan(stage, 1, res.gpus_per_node, None, res.cpu, res.memory_gb * 1024,
                                     res.shared_memory_gb * 1024, retries, params.compute.image)
            continue
        if stage == "eval" and res.nodes != 1:
            raise ProfileError(
                f"compute.eval.nodes={res.nodes}: evaluation fans out one pod per variant; use nodes: 1 "
                "and more gpus_per_node instead")
        nproc = res.gpus_per_node if res.gpus_per_node > 0 else 1
        plans[stage] = StagePlan(stage, int(res.nodes), int(res.gpus_per_node), nproc, int(res.cpu),
                                 int(res.memory_gb) * 1024, int(res.shared_memory_gb) * 1024, retries,
                                 params.compute.image)
    return plans


def _kubernetes_args(plan: StagePlan, deploy: DeployConfig, *, port: bool) -> dict[str, Any]:
    args = {
        "image": plan.image,
        "cpu": plan.cpu,
        "memory": plan.memory_mb,
        "gpu": plan.gpus_per_node if plan.gpus_per_node > 0 else None,
        "shared_memory": plan.shared_memory_mb if plan.shared_memory_mb > 0 else None,
    }
    if port:
        args["port"] = TORCHRUN_PORT
    args.update(deploy.kubernetes)
    return {k: v for k, v in args.items() if v is not None}


def step_decorators(deploy: DeployConfig, params=None, step_names=()) -> dict[str, list[tuple[str, dict]]]:
    """``{step: [(decorator name, kwargs), ...]}`` for every step of the flow (pure; testable)."""
    plans = stage_plans(deploy, params)
    out: dict[str, list[tuple[str, dict]]] = {}
    forward = {k: os.environ[k] for k in deploy.forward_env if os.environ.get(k)}
    for step in step_names:
        decos: list[tuple[str, dict]] = []
        stage = TRAIN_STEPS.get(step) or ("eval" if step == EVAL_STEP else None)
        if deploy.profile == "local":
            if step in TRAIN_STEPS:
                decos.append(("parallel", {}))
            if stage and plans[stage].retries:
                decos.append(("retry", {"times": plans[stage].retries, "minutes_between_retries": 0}))
        else:
            if stage:
                plan = plans[stage]
                env = {"RTDMD_PROFILE": "kubernetes", "RTDMD_STAGE_NODES": str(plan.nodes),
                       "RTDMD_NPROC_PER_NODE": str(plan.nproc_per_node), **forward}
                if step in TRAIN_STEPS:
                    decos.append(("torchrun", {"nproc_per_node": plan.nproc_per_node,
                                               "master_port": str(TORCHRUN_PORT)}))
                decos.append(("kubernetes", _kubernetes_args(plan, deploy, port=step in TRAIN_STEPS)))
                if plan.retries:
                    decos.append(("retry", {"times": plan.retries, "minutes_between_retries": 1}))
                decos.append(("environment", {"vars": env}))
            else:
                light = StagePlan("light", 1, 0, 1, int(deploy.light.get("cpu", 2)),
                                  int(deploy.light.get("memory_gb", 8)) * 1024, 0, 0, plans["rl"].image)
                decos.append(("kubernetes", _kubernetes_args(light, deploy, port=False)))
                decos.append(("environment", {"vars": {"RTDMD_PROFILE": "kubernetes", **forward}}))
        out[step] = decos
    return out


def apply_profile(mutable_flow, config_name: str = "deploy") -> DeployConfig:
    """Called from the flow's FlowMutator ``pre_mutate``: add the profile's decorators."""
    configs = dict(mutable_flow.configs)
    value = configs.get(config_name)
    deploy = parse_deploy_config(dict(value) if value is not None else None)
    steps = dict(mutable_flow.steps)
    for step, decos in step_decorators(deploy, step_names=sorted(steps)).items():
        for name, kwargs in decos:
            steps[step].add_decorator(name, deco_kwargs=kwargs)
    return deploy
