"""Registry lifecycle: register -> promote (gates pass) -> a worse candidate refused (failing gate
named) -> forced promotion with a reason -> rollback -> history shows every move; loading
``models:/rtdmd-toy2d@champion`` after each move yields that version's model."""
from __future__ import annotations

import json

import pytest
import torch

from rtdmd.cli import main as cli
from rtdmd.registry import (GateFailure, NoEvaluationError, RegistryError, history, load_registered, promote,
                            register_candidate, rollback)
from rtdmd.registry.client import connect
from rtdmd.registry.constants import CANDIDATE, CHAMPION
from rtdmd.registry.gates import evaluate_gates

from .helpers import evaluation

PROMPTS = ["ring", "square", "ring"]


def _points(ref: str, store: str) -> torch.Tensor:
    return load_registered(ref, tracking_uri=store).generate(PROMPTS, seed=0)


def _champion_is(store: str, version: str, expected: dict[str, torch.Tensor]) -> None:
    m = load_registered("models:/rtdmd-toy2d@champion", tracking_uri=store)
    assert m.version == version and CHAMPION in m.resolved.aliases
    assert torch.equal(m.generate(PROMPTS, seed=0), expected[version]), f"@champion does not generate v{version}'s samples"


def test_register_promote_refuse_force_rollback_history(store, toy_params, toy_stacks, capsys):
    # registration: everything needed to use the version, alias `candidate`
    evals = {"a": evaluation(0.50, 0.60, 0.40, 0.55), "b": evaluation(0.70, 0.65, 0.45, 0.60),
             "c": evaluation(0.55, 0.70, 0.50, 0.60)}
    r1 = register_candidate(artifact_uri=toy_stacks["a"][1], params=toy_params, evaluation=evals["a"], tracking_uri=store,
                            lineage={"metaflow.pathspec": "RtdmdFlow/1/register/9"})
    assert (r1["name"], r1["version"], r1["alias"]) == ("rtdmd-toy2d", "1", CANDIDATE)
    client = connect(store)
    mv = client.get_model_version("rtdmd-toy2d", "1")
    assert mv.tags["rtdmd.stack"] == "cold_start>rl" and mv.tags["rtdmd.base_model"] == toy_params.model.pretrained
    assert json.loads(mv.tags["rtdmd.sampler"])["step_list"] == list(toy_params.sampler.step_list)
    assert float(mv.tags["eval.toy2d_target"]) == pytest.approx(0.5) and mv.tags["metaflow.pathspec"]
    resolved = load_registered("models:/rtdmd-toy2d/1", tracking_uri=store).resolved
    files = {p.relative_to(resolved.local_dir).as_posix() for p in resolved.local_dir.rglob("*") if p.is_file()}
    assert {"rtdmd_model.json", "params.yaml", "eval_summary.json", "README.md",
            "stack/00-cold_start/generator/pytorch_lora_weights.safetensors",
            "stack/00-cold_start/generator/adapter_config.json", "stack/01-rl/generator/pytorch_lora_weights.safetensors",
            "stack/01-rl/manifest.json"} <= files
    assert [s["stage"] for s in resolved.info["stack"]] == ["cold_start", "rl"]

    # what each version must generate: the LoRA artifact itself, loaded directly
    expected = {"1": _points(toy_stacks["a"][1], store)}
    assert not torch.equal(expected["1"], load_registered(toy_stacks["a"][0]).generate(PROMPTS, seed=0))  # RL on top

    # 1. first promotion (no champion yet: champion gates skipped) through the CLI
    assert cli(["promote", "--backbone", "toy2d", "--tracking-uri", store]) == 0
    assert "promoted rtdmd-toy2d v1 to champion (previous champion: none)" in capsys.readouterr().out
    _champion_is(store, "1", expected)

    # 2. a better candidate passes every gate
    r2 = register_candidate(artifact_uri=toy_stacks["b"][1], params=toy_params, evaluation=evals["b"], tracking_uri=store)
    expected["2"] = _points(toy_stacks["b"][1], store)
    res = promote("toy2d", tracking_uri=store, user="alice")
    assert (res.version, res.previous, res.forced) == ("2", "1", False) and res.report.passed
    assert {r.gate for r in res.report.results if r.status == "pass"} >= {"vs_champion:toy2d_target",
                                                                          "vs_cold_start:toy2d_target"}
    _champion_is(store, "2", expected)
    assert r2["version"] == "2"

    # 3. a worse candidate is refused, and the failing gate is named (CLI: exit 2, one error line)
    register_candidate(artifact_uri=toy_stacks["c"][1], params=toy_params, evaluation=evals["c"], tracking_uri=store)
    expected["3"] = _points(toy_stacks["c"][1], store)
    with pytest.raises(GateFailure) as err:
        promote("toy2d", tracking_uri=store)
    assert "vs_champion:toy2d_target" in str(err.value) and [r.gate for r in err.value.report.failed] == [
        "vs_champion:toy2d_target"]
    assert cli(["promote", "--backbone", "toy2d", "--version", "3", "--tracking-uri", store]) == 2
    errline = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rtdmd: error:")]
    assert len(errline) == 1 and "refused" in errline[0] and "vs_champion:toy2d_target" in errline[0]
    _champion_is(store, "2", expected)

    # 4. forcing needs a reason; with one the move happens and is recorded
    with pytest.raises(RegistryError, match="--reason"):
        promote("toy2d", version=3, force=True, tracking_uri=store)
    assert cli(["promote", "--backbone", "toy2d", "--version", "3", "--force", "--reason", "ops: v2 OOMs on L4",
                "--tracking-uri", store]) == 0
    assert "FORCED promoted rtdmd-toy2d v3" in capsys.readouterr().out
    _champion_is(store, "3", expected)

    # 5. rollback restores the previous champion
    move = rollback("toy2d", reason="v3 regressed in production", tracking_uri=store, user="bob")
    assert (move.action, move.version, move.previous) == ("rollback", "2", "3")
    _champion_is(store, "2", expected)

    # 6. the history shows every move (and the refusals) with time, user, previous champion, gates, reason
    moves = history("toy2d", tracking_uri=store)
    got = [(m.action, m.version, m.previous) for m in moves]
    assert got == [("promote", "1", None), ("promote", "2", "1"), ("refused", "3", "2"), ("refused", "3", "2"),
                   ("force-promote", "3", "2"), ("rollback", "2", "3")]
    assert [m.seq for m in moves] == list(range(1, 7)) and all(m.time and m.user and m.host for m in moves)
    assert moves[1].user == "alice" and moves[-1].user == "bob"
    assert moves[4].reason == "ops: v2 OOMs on L4" and moves[5].reason == "v3 regressed in production"
    assert any(g["gate"] == "vs_champion:toy2d_target" and g["status"] == "fail" for g in moves[4].gates)
    tags3 = client.get_model_version("rtdmd-toy2d", "3").tags
    assert tags3["rtdmd.champion.previous"] == "v2" and tags3["rtdmd.champion.reason"] == "ops: v2 OOMs on L4"
    assert tags3["rtdmd.champion.action"] == "force-promote" and "rtdmd.champion.until" in tags3
    assert client.get_model_version("rtdmd-toy2d", "1").tags["rtdmd.champion.replaced_by"].startswith("v2")
    assert cli(["history", "--backbone", "toy2d", "--tracking-uri", store]) == 0
    out = capsys.readouterr().out
    for needle in ("force-promote", "rollback", "refused", "ops: v2 OOMs on L4", "alice", "bob",
                   "champion -> v2", "candidate -> v3"):
        assert needle in out, out

    # rolling back past the first champion is refused (never zero champions)
    rollback("toy2d", tracking_uri=store)
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback("toy2d", tracking_uri=store)
    assert str(connect(store).get_registered_model("rtdmd-toy2d").aliases[CHAMPION]) == "1"


def test_registration_is_idempotent_per_source_run(store, toy_params, toy_stacks):
    from mlflow.tracking import MlflowClient

    from rtdmd.tracking import Tracker

    run = Tracker(store, "rtdmd-toy2d").client.create_run(Tracker(store, "rtdmd-toy2d").experiment_id).info.run_id
    a = register_candidate(artifact_uri=toy_stacks["a"][1], params=toy_params, tracking_uri=store, run_id=run)
    b = register_candidate(artifact_uri=toy_stacks["a"][1], params=toy_params, tracking_uri=store, run_id=run,
                           evaluation=evaluation(0.5, 0.5, 0.4, 0.4))
    assert a["version"] == b["version"] == "1" and b["evaluated"]
    assert len(MlflowClient(store, store).search_model_versions("name='rtdmd-toy2d'")) == 1


def test_gates_held_out_cold_start_and_required():
    """The gate logic on its own: held-out regression, cold-start gate, required rewards, no champion."""
    from rtdmd.config import load_params

    cfg = load_params("toy2d", ["registry.required_rewards=[toy2d_target,toy2d_region,clip]",
                                "eval.rewards={toy2d_target: 1.0, toy2d_region: 1.0, clip: 1.0}",
                                "registry.held_out_tolerance=0.05", "registry.min_delta_vs_cold_start={toy2d_target: 0.1}"]).registry
    cand = evaluation(0.8, 0.6, 0.75, 0.6, held_out={"clip": 0.30}, cold_held_out={"clip": 0.40})
    champ = evaluation(0.7, 0.6, 0.6, 0.6, held_out={"clip": 0.33})
    rep = evaluate_gates(cfg, cand, champ, champion_version="4")
    status = {r.gate: r.status for r in rep.results}
    assert status["vs_champion:toy2d_target"] == "pass"
    assert status["vs_cold_start:toy2d_target"] == "fail"  # 0.8 - 0.75 < 0.1
    assert status["held_out_vs_champion:clip"] == "pass"  # 0.30 >= 0.33 - 0.05
    assert status["held_out_vs_cold_start:clip"] == "fail"  # 0.30 < 0.40 - 0.05: reward hacking
    assert not rep.passed and "held_out_vs_cold_start:clip" in rep.summary()
    no_clip = evaluation(0.9, 0.6, 0.5, 0.5)
    rep = evaluate_gates(cfg, no_clip, None, champion_version=None)
    status = {r.gate: r.status for r in rep.results}
    assert status["required:clip"] == "fail" and status["vs_champion:toy2d_target"] == "skip"
    # a champion without an evaluation cannot be beaten by the gates (force or re-evaluate)
    rep = evaluate_gates(cfg, cand, None, champion_version="2")
    assert any(r.gate == "vs_champion:toy2d_target" and r.status == "fail" and "no evaluation" in r.detail
               for r in rep.results)


def test_promotion_without_evaluation_is_refused(store, toy_params, toy_stacks, capsys):
    register_candidate(artifact_uri=toy_stacks["a"][1], params=toy_params, tracking_uri=store)
    with pytest.raises(NoEvaluationError, match="no evaluation recorded"):
        promote("toy2d", tracking_uri=store)
    assert cli(["promote", "--backbone", "toy2d", "--tracking-uri", store]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no evaluation recorded" in err[0] and "rtdmd eval" in err[0]
    assert CHAMPION not in (connect(store).get_registered_model("rtdmd-toy2d").aliases or {})
    # forced (with a reason) it is allowed and recorded as such
    res = promote("toy2d", tracking_uri=store, force=True, reason="bootstrap the first champion")
    assert res.forced and history("toy2d", tracking_uri=store)[-1].gates[0]["gate"] == "evaluation"


def test_rtdmd_eval_records_an_evaluation_that_unlocks_promotion(store, toy_params, toy_stacks, tmp_path, capsys):
    """`rtdmd eval <version> --record` evaluates the version and its own cold start side by side
    and records the result, so the gates can run (no --force needed)."""
    register_candidate(artifact_uri=toy_stacks["a"][1], params=toy_params, tracking_uri=store)
    out = tmp_path / "eval"
    assert cli(["eval", "models:/rtdmd-toy2d/1", "--record", "--samples-per-prompt", "32", "--no-images",
                "--quiet", "--out", str(out), "--tracking-uri", store]) == 0
    assert "recorded the evaluation on rtdmd-toy2d v1" in capsys.readouterr().out
    summary = json.loads((out / "metadata.json").read_text())
    assert set(summary["scores"]) == {"v1", "v1-cold_start"}
    rec = json.loads(connect(store).get_model_version("rtdmd-toy2d", "1").tags["rtdmd.eval"])
    assert rec["candidate"]["variant"] == "v1" and rec["cold_start"]["variant"] == "v1-cold_start"
    assert rec["candidate"]["scores"]["toy2d_target"] == pytest.approx(summary["scores"]["v1"]["toy2d_target"])
    # the registered sampler settings were used (4 CPS steps at the registered eta)
    assert summary["variants"]["v1"]["sampler"]["step_list"] == [float(s) for s in toy_params.sampler.step_list]
    # gates now run on the recorded numbers (toy2d: RL must not fall below its own cold start)
    gate_ok = rec["candidate"]["scores"]["toy2d_target"] >= rec["cold_start"]["scores"]["toy2d_target"]
    if gate_ok:
        assert promote("toy2d", tracking_uri=store).version == "1"
    else:
        with pytest.raises(GateFailure, match="vs_cold_start:toy2d_target"):
            promote("toy2d", tracking_uri=store)
