"""A registered version is an MLflow pyfunc model: ``mlflow.pyfunc.load_model`` by alias returns
the version's samples (the same as ``load_registered`` and as the LoRA artifact loaded directly),
the logged model carries the signature, input example, sampler settings and evaluation summary,
and a version registered as loose files (before versions were pyfunc models) still loads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rtdmd.registry import load_registered, promote, record_evaluation, register_candidate
from rtdmd.registry.client import connect

from .helpers import evaluation

PROMPTS = ["ring", "square", "ring"]


def test_pyfunc_round_trip_by_alias(store, toy_params, toy_stacks):
    import mlflow

    reg = register_candidate(artifact_uri=toy_stacks["a"][1], params=toy_params, tracking_uri=store,
                             evaluation=evaluation(0.5, 0.6, 0.4, 0.5))
    promote("toy2d", tracking_uri=store)
    mlflow.set_tracking_uri(store)
    try:
        model = mlflow.pyfunc.load_model("models:/rtdmd-toy2d@champion")
        x = model.predict(["ring"])
        batch = model.predict(PROMPTS, params={"seed": 3})
    finally:
        mlflow.set_tracking_uri(None)
    assert isinstance(x, np.ndarray) and x.shape == (1, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    # the registered stack's samples (sample i seeded seed + i), as its LoRA artifact gives them
    direct = load_registered(toy_stacks["a"][1]).generate(PROMPTS, seed=3)
    assert np.array_equal(batch, direct.numpy())
    m = load_registered("models:/rtdmd-toy2d@champion", tracking_uri=store)
    assert m.pyfunc is not None and torch.equal(m.generate(PROMPTS, seed=3), direct)
    assert np.array_equal(m.pyfunc.predict(PROMPTS, params={"seed": 3}), batch)

    # what the MLflow UI shows for the logged model behind the version
    client = connect(store)
    mv = client.get_model_version("rtdmd-toy2d", reg["version"])
    model_id = mv.source.removeprefix("models:/")
    assert model_id.startswith("m-")
    lm = client.get_logged_model(model_id)
    assert lm.source_run_id == reg["run_id"] and str(lm.status) in ("READY", "LoggedModelStatus.READY")
    assert json.loads(lm.params["sampler.step_list"].replace("'", '"')) == list(toy_params.sampler.step_list)
    assert lm.params["stack"] == "cold_start>rl" and lm.tags["eval.toy2d_target"] == "0.5"
    assert {m.key: m.value for m in lm.metrics}["eval/toy2d_target"] == pytest.approx(0.5)
    info = model.metadata
    sig = info.signature.to_dict()
    assert json.loads(sig["inputs"]) == [{"type": "string", "required": True}]
    assert json.loads(sig["outputs"])[0]["tensor-spec"]["shape"] == [-1, 2]
    assert {p["name"] for p in json.loads(sig["params"])} == {"seed", "step_list", "eta", "guidance"}
    assert info.saved_input_example_info is not None and "toy2d_target 0.5" in mv.description

    # a later evaluation reaches the logged model too
    record_evaluation("models:/rtdmd-toy2d/1", evaluation(0.7, 0.6, 0.4, 0.5), tracking_uri=store)
    assert client.get_logged_model(model_id).tags["eval.toy2d_target"] == "0.7"

    # a version registered as loose files under its run (before versions were pyfunc models) loads too
    run = client.create_run(lm.experiment_id).info.run_id
    client.log_artifacts(run, str(m.resolved.local_dir), "registry/old")
    client.create_model_version("rtdmd-toy2d", f"{client.get_run(run).info.artifact_uri}/registry/old", run_id=run)
    old = load_registered("models:/rtdmd-toy2d/2", tracking_uri=store)
    assert old.pyfunc is None and old.version == "2" and torch.equal(old.generate(PROMPTS, seed=3), direct)
