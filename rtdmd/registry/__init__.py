"""MLflow model registry for RTDMD LoRA stacks (DESIGN.md §4 "MLflow"): register, load, promote.

* :func:`register_candidate` (``rtdmd.registry.register``) — a trained stack becomes a new version
  of ``rtdmd-<backbone>``, an MLflow pyfunc model (:mod:`rtdmd.registry.pyfunc`: adapters in
  diffusers layout + stacking order, base model id and revision, sampler settings, params,
  manifests, evaluation summary; ``mlflow.pyfunc.load_model(...).predict(prompts)``) with alias ``candidate``;
  the flow's ``register`` step calls it through :func:`rtdmd.registry.flow.register_from_flow`.
* :func:`load_registered` (``rtdmd.registry.load``) — ``models:/rtdmd-<backbone>@champion`` (or a
  version / artifact URI) -> backbone + generator with the stack merged + sampler settings (a thin
  layer on the pyfunc model).
* :func:`promote` / :func:`rollback` / :func:`history` (``rtdmd.registry.promote``) — gated moves
  of ``champion`` (gates in the params' ``registry:`` section, :mod:`rtdmd.registry.gates`),
  serialised by a lock in the model's tags (:mod:`rtdmd.registry.lock`), each recorded with time,
  user, previous champion, gate results and reason.

CLI: ``rtdmd promote | rollback | history | infer | eval | ui`` (``rtdmd <cmd> --help``).
"""
from rtdmd.registry.client import model_name, parse_ref
from rtdmd.registry.constants import CANDIDATE, CHAMPION
from rtdmd.registry.errors import (GateFailure, LockTimeout, ModelRefError, NoEvaluationError, RegistryError,
                                   RegistryUnreachable)
from rtdmd.registry.load import RegisteredPipeline, ResolvedModel, load_registered, resolve_model
from rtdmd.registry.promote import format_history, history, promote, rollback
from rtdmd.registry.register import record_evaluation, register_candidate

__all__ = ["CANDIDATE", "CHAMPION", "GateFailure", "LockTimeout", "ModelRefError", "NoEvaluationError",
           "RegisteredPipeline", "RegistryError", "RegistryUnreachable", "ResolvedModel", "format_history", "history",
           "load_registered", "model_name", "parse_ref", "promote", "record_evaluation", "register_candidate",
           "resolve_model", "rollback"]
