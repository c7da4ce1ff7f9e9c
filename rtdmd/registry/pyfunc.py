"""A registered RTDMD version as an MLflow ``pyfunc`` model::

    import mlflow
    m = mlflow.pyfunc.load_model("models:/rtdmd-toy2d@champion")
    x = m.predict(["ring", "square"], params={"seed": 0})   # numpy float32: toy2d [N, 2] points,
                                                           # image backbones [N, 3, H, W] in [0, 1]

The logged model (``models:/<model_id>``, registered as a version of ``rtdmd-<backbone>``) holds

* ``artifacts/rtdmd/``: the version's RTDMD files (:mod:`rtdmd.registry.register`): the LoRA stack
  in the diffusers/peft layout (``stack/NN-<stage>/generator/pytorch_lora_weights.safetensors`` +
  ``adapter_config.json``, oldest first), ``rtdmd_model.json`` (stack order, base model id +
  revision, CPS sampler settings), ``params.yaml`` (rebuilds the base model), evaluation summary;
* ``pyfunc_code.py`` (MLflow "model from code": nothing is pickled) whose :class:`RtdmdPyfuncModel`
  verifies the files in ``load_context`` and builds the backbone with the project's own code
  (``rtdmd.backbones.build_backbone`` from the registered params), the LoRA stack merged in order;
* the signature: input a list of prompt strings (one unnamed string column), output
  a float32 tensor (the samples, one per prompt), params ``seed`` (sample ``i`` uses ``seed + i``)
  and the registered sampler settings ``step_list`` / ``eta`` / ``guidance`` as defaults;
* an input example (toy/tiny backbones: MLflow checks it by loading the model and predicting,
  which for a real backbone would build the whole base model at registration);
* the sampler settings, base model and stack as logged-model params; the evaluation summary as
  logged-model metrics (``eval/<reward>``), tags (``eval.<reward>``) and its description; the
  registered version in MLflow's ``mlflow.modelVersions`` tag.

``model_config`` of ``load_model``: ``device`` (default ``cpu``) and ``overrides`` (dotted params
overrides, as ``rtdmd infer --override``). Loading needs this package importable (``rtdmd`` is listed
in the model's requirements).
"""
from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path
from typing import Any, Mapping

import mlflow.pyfunc

from rtdmd.registry.client import ModelRef, quiet_mlflow
from rtdmd.registry.constants import ARTIFACT_KEY
from rtdmd.registry.parts import RegisteredPipeline, build_pipeline, resolve_local

CODE_FILE = Path(__file__).with_name("pyfunc_code.py")
MODEL_TYPE = "rtdmd-lora-stack"


class RtdmdPyfuncModel(mlflow.pyfunc.PythonModel):
    """Prompts -> samples with the registered LoRA stack and CPS sampler settings."""

    pipeline: RegisteredPipeline | None = None

    def load_context(self, context) -> None:
        cfg = dict(context.model_config or {})
        root = Path(context.artifacts[ARTIFACT_KEY])
        ref = ModelRef(str(cfg.get("ref") or root), artifact_uri=str(root))
        resolved = resolve_local(root, ref, overrides=list(cfg.get("overrides") or ()))
        self.pipeline = build_pipeline(resolved, device=str(cfg.get("device") or "cpu"))

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        p = dict(params or {})
        x = self.pipeline.generate(prompt_list(model_input), seed=int(p.get("seed", 0)), step_list=p.get("step_list"),
                                   eta=p.get("eta"), guidance=p.get("guidance"))
        return x.detach().float().cpu().numpy()


def prompt_list(model_input: Any) -> list[str]:
    """The prompts of a pyfunc input: a list/array/Series of strings, a string, or a DataFrame
    (column ``prompt``, else its only column)."""
    import pandas as pd

    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        if "prompt" in model_input.columns:
            col = model_input["prompt"]
        elif len(model_input.columns) == 1:
            col = model_input.iloc[:, 0]
        else:
            raise ValueError(f"expected a 'prompt' column, got columns {list(model_input.columns)}")
        return [str(v) for v in col.tolist()]
    if isinstance(model_input, Mapping) and "prompt" in model_input:
        return prompt_list(list(model_input["prompt"]))
    return [str(v) for v in list(model_input)]


def signature(params, sampler: Mapping[str, Any]):
    """Input ``prompt`` strings; output float32 samples; params seed + the registered sampler settings."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec

    res = int(params.model.resolution)
    shape = (-1, 2) if params.model.family == "toy2d" else (-1, 3, res, res)
    steps = [float(s) for s in sampler.get("step_list") or params.sampler.step_list]
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string)]),  # a list of prompts (or a one-column frame)
        outputs=Schema([TensorSpec(np.dtype(np.float32), shape, "samples")]),
        params=ParamSchema([ParamSpec("seed", DataType.long, 0),
                            ParamSpec("step_list", DataType.double, steps, (-1,)),
                            ParamSpec("eta", DataType.double, float(sampler.get("eta", params.sampler.eta))),
                            ParamSpec("guidance", DataType.double, float(sampler.get("guidance", params.sampler.guidance)))]))


def _requirements() -> list[str]:
    reqs = []
    for dist in ("rtdmd", "mlflow", "torch", "diffusers", "peft"):
        try:
            reqs.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def logged_params(info: Mapping[str, Any]) -> dict[str, str]:
    """What the logged model shows as its params: base model, stack, sampler settings."""
    s, base = info["sampler"], info["base_model"]
    return {"backbone": str(info["backbone"]), "base_model": str(base.get("id")),
            "base_revision": str(base.get("revision") or ""), "stack": ">".join(e["stage"] for e in info["stack"]),
            "lora_rank": str(info["stack"][-1].get("rank")), "lora_alpha": str(info["stack"][-1].get("alpha")),
            "sampler.nfe": str(s.get("nfe") or len(s.get("step_list") or [])),
            "sampler.step_list": str(list(s.get("step_list") or [])), "sampler.eta": str(s.get("eta")),
            "sampler.guidance": str(s.get("guidance")), "params_hash": str(info.get("params_hash"))}


def record_on_logged_model(client, model_id: str, run_id: str | None, record: Mapping[str, Any]) -> None:
    """The evaluation summary on the logged model: tags ``eval.<reward>`` (+ the cold start's) and,
    when the model has a source run, metrics ``eval/<reward>`` linked to it."""
    import time

    from mlflow.entities import Metric

    cand = record["candidate"]["scores"]
    cold = (record.get("cold_start") or {}).get("scores") or {}
    tags = {f"eval.{r}": f"{v:.6g}" for r, v in cand.items()}
    tags.update({f"eval.cold_start.{r}": f"{v:.6g}" for r, v in cold.items()})
    tags["eval.variant"] = str(record["candidate"].get("variant"))
    client.set_logged_model_tags(model_id, tags)
    if run_id:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"eval/{r}", float(v), now, 0, model_id=model_id)
                                          for r, v in sorted(cand.items())])


def model_id_of(mv) -> str | None:
    """The logged model behind a model version (None: a version registered as loose files)."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    m = re.fullmatch(r"models:/(m-[0-9a-f]+)", str(mv.source or ""))
    return m.group(1) if m else None


def link_version(client, model_id: str, mv) -> None:
    """Show the registered version on its logged model (MLflow's ``mlflow.modelVersions`` tag, as
    ``mlflow.register_model`` sets it) and the version description as the model's description."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    known = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    known.append({"name": mv.name, "version": str(mv.version)})
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(known),
                                            "mlflow.note.content": mv.description or ""})


def using_tracking_uri(uri: str):
    """A context in which MLflow's fluent API (``log_model``, the registry's model lookups) uses ``uri``."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    return _use_tracking_uri(uri)


def log_version_model(client, tracking_uri: str, root: Path, *, experiment_id: str, run_id: str | None, params,
                      info: Mapping[str, Any], record: Mapping[str, Any] | None, name: str) -> str:
    """Log ``root`` (a version's RTDMD files) as a pyfunc model; returns its model id."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    lm = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, params=logged_params(info),
                                    tags={"rtdmd.backbone": str(info["backbone"]),
                                          "rtdmd.manifest_sha256": info["stack"][-1]["manifest_sha256"]},
                                    model_type=MODEL_TYPE)
    # MLflow validates an input example by loading the model and predicting on it: cheap for the
    # toy/tiny backbones, a full base-model build for a real one (then the signature documents the input)
    example = (["ring"] if params.model.family == "toy2d" else ["a red cube on a table"]) if params.model.tiny else None
    try:
        with using_tracking_uri(tracking_uri), quiet_mlflow():
            mlflow.pyfunc.log_model(name=name, python_model=str(CODE_FILE), artifacts={ARTIFACT_KEY: str(root)},
                                    signature=signature(params, info["sampler"]), input_example=example,
                                    pip_requirements=_requirements(), model_id=lm.model_id)
    except Exception:
        client.finalize_logged_model(lm.model_id, LoggedModelStatus.FAILED)
        raise
    if run_id:
        client.log_outputs(run_id, [LoggedModelOutput(lm.model_id, step=0)])
    if record is not None:
        record_on_logged_model(client, lm.model_id, run_id, record)
    client.finalize_logged_model(lm.model_id, LoggedModelStatus.READY)
    return lm.model_id
