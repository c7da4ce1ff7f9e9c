"""End to end on the local profile: the whole flow on toy2d and tiny_flux2, the evaluation matrix,
MLflow bookkeeping, and fault injection (a torchrun worker SIGKILLed during RL -> @retry / resume
continue from the latest checkpoint and reproduce the uninterrupted artifact)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import FLOW, FLOW_NAME, ROOT, assert_ok, list_artifacts, metaflow_run, mlflow_runs, run_flow, run_id_of

pytestmark = pytest.mark.slow


def _run_dir(env, run_id) -> Path:
    return Path(env["RTDMD_ARTIFACT_ROOT"]) / FLOW_NAME / run_id


# ----------------------------------------------------------------------------- toy2d, full flow
def test_toy2d_full_flow_local(toy2d_run):
    env, run_id = toy2d_run["env"], toy2d_run["run_id"]
    out = toy2d_run["stdout"] + toy2d_run["stderr"]
    info = metaflow_run(env, run_id)
    assert info["successful"], info
    assert {"start", "prep", "cold_start", "rl", "eval_variant", "eval_join", "register", "end"} <= set(info["steps"])
    # Metaflow artifacts carry URIs and manifests only (no tensors)
    assert info["max_artifact"][1] < 2_000_000, info["max_artifact"]

    from rtdmd.artifacts.fs import verify_manifest

    base = _run_dir(env, run_id)
    cs, rl = base / "cold_start" / "artifact", base / "rl" / "artifact"
    for d in (base / "prep", cs, rl, base / "eval" / "matrix"):
        verify_manifest(d)
    rl_manifest = json.loads((rl / "manifest.json").read_text())
    assert rl_manifest["stage"] == "rl" and rl_manifest["backbone"] == "toy2d"
    assert rl_manifest["parent"]["uri"] == str(cs), "the RL artifact must stack on this run's cold start"
    assert any((base / "rl" / "checkpoints").glob("step-*/COMPLETE"))
    data = info["data"]
    assert data["final"]["uri"] == str(rl) and data["cold_start_out"]["uri"] == str(cs)
    assert "Where to look" in out and "mlflow ui --backend-store-uri" in out

    # the evaluation matrix: RTDMD-4 beats the 50-step teacher on the toy2d training reward
    matrix = json.loads((base / "eval" / "matrix" / "matrix.json").read_text())
    scores = matrix["scores"]
    assert set(scores) == {"teacher-50", "teacher-4", "cold_start-4", "rtdmd-4"}
    for reward in ("toy2d_target", "toy2d_region"):
        assert all(reward in s for s in scores.values())
    assert scores["rtdmd-4"]["toy2d_target"] > scores["teacher-50"]["toy2d_target"], scores
    table = (base / "eval" / "matrix" / "table.md").read_text()
    assert "rtdmd-4" in table and "teacher-50" in table

    # MLflow: one parent run, nested stage runs, one evaluation run per variant (metric per reward)
    runs = mlflow_runs(env, "rtdmd-toy2d")
    mine = [r for r in runs if r["tags"].get("rtdmd.logical_run_id") == run_id]
    (parent,) = [r for r in mine if r["tags"]["rtdmd.kind"] == "flow"]
    assert parent["status"] == "FINISHED"
    assert parent["tags"]["metaflow.run_id"] == run_id and parent["tags"]["metaflow.pathspec"].startswith(f"{FLOW_NAME}/{run_id}/")
    assert parent["tags"]["git.commit"] and parent["tags"]["rtdmd.data_version"]
    assert parent["tags"]["rtdmd.final_artifact_uri"] == str(rl)
    assert parent["metrics"]["eval/rtdmd-4/toy2d_target"] == pytest.approx(scores["rtdmd-4"]["toy2d_target"])
    stages = {r["tags"].get("rtdmd.stage"): r for r in mine if r["tags"]["rtdmd.kind"] == "stage"}
    assert set(stages) == {"prep", "cold_start", "rl"}
    for name in ("cold_start", "rl"):
        st = stages[name]
        assert st["parent"] == parent["id"] and st["status"] == "FINISHED"
        assert st["tags"]["rtdmd.artifact_uri"] == str(base / name / "artifact")
        assert st["params"]["rl.epochs"] == "24"  # flattened config as params
        assert st["metrics"], f"no trainer metrics logged into the {name} run"
        assert "system/cpu_utilization_percentage" in st["metrics"], f"no system metrics on the {name} run"
        (inp,) = _dataset_inputs(env, st["id"])  # the prepared prompt set, versioned by DVC
        assert inp.dataset.name == "toy2d/train" and inp.dataset.digest.endswith(".dir")
        assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    # progress bars in the stages' logs: one per stage (rank 0 of 2), with the total and the rate
    for name, total in (("cold_start", 300), ("rl", 24)):
        done = [ln for ln in out.splitlines() if f"{name}: 100%" in ln]
        assert len(done) == 1 and re.search(rf" {total}/{total} \[.*(step/s|s/step)", done[0]), done
    evals = {r["tags"]["rtdmd.variant"]: r for r in mine if r["tags"]["rtdmd.kind"] == "eval"}
    assert set(evals) == set(scores)
    for name, r in evals.items():
        assert r["parent"] == parent["id"]
        assert r["metrics"]["toy2d_target"] == pytest.approx(scores[name]["toy2d_target"])
        assert "toy2d_region" in r["metrics"]
    assert "eval/matrix.json" in list_artifacts(env, parent["id"], "eval")


def _dataset_inputs(env, run_id):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).get_run(run_id).inputs.dataset_inputs


# ----------------------------------------------------------------------------- fault injection
def _procs() -> list[tuple[int, list[str]]]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        out.append((int(pid), [a.decode(errors="replace") for a in raw.split(b"\0") if a]))
    return out


def _workers(out_dir: Path) -> list[int]:
    """torchrun worker processes of ``rtdmd.train rl --out <out_dir>`` (not the torchrun agent)."""
    pids = []
    for pid, cmd in _procs():
        if "rtdmd.train" in cmd and "rl" in cmd and str(out_dir) in cmd and "torch.distributed.run" not in cmd:
            pids.append(pid)
    return sorted(pids)


def _complete(ckpts: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in ckpts.glob("step-*/COMPLETE"))


def _wait(pred, timeout: float, what: str, proc=None, interval: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"flow exited (rc={proc.returncode}) while waiting for {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def test_rl_worker_killed_then_retry_and_resume_continue_from_checkpoint(toy2d_run, flow_base):
    env = toy2d_run["env"]
    ref_base = _run_dir(env, toy2d_run["run_id"])
    root = Path(env["RTDMD_ARTIFACT_ROOT"]) / FLOW_NAME
    before = {p.name for p in root.iterdir()}
    log = flow_base / "logs" / "fault_run.log"
    cmd = [sys.executable, str(FLOW), "run", "--backbone", "toy2d", "--overrides", toy2d_run["overrides"],
           "--stages", "prep,rl", "--cold-start-uri", str(ref_base / "cold_start" / "artifact")]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            run_dir = _wait(lambda: next((root / n for n in {p.name for p in root.iterdir()} - before), None),
                            600, "the new run's directory", proc)
            out_dir, ckpts = run_dir / "rl", run_dir / "rl" / "checkpoints"
            kills = []
            for attempt in range(2):  # attempt 0: killed -> @retry (1 from params); attempt 1: killed -> fails
                floor = kills[-1] if kills else 0
                _wait(lambda: [s for s in _complete(ckpts) if s > floor] and _workers(out_dir), 900,
                      f"a new RL checkpoint after step {floor} (attempt {attempt})", proc, interval=0.05)
                victim = _workers(out_dir)[-1]
                os.kill(victim, signal.SIGKILL)
                _wait(lambda: not _workers(out_dir), 120, "torchrun to stop the other workers", proc)
                kills.append(_complete(ckpts)[-1])  # the latest complete checkpoint at the kill
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert rc != 0, "the run must fail after the second kill (retries exhausted)"
    assert "was killed by SIGKILL" in text, "the step error must name the killed worker"
    total = int(re.search(r"rl\.epochs=(\d+)", toy2d_run["overrides"]).group(1))
    assert 0 < kills[0] < kills[1] < total, kills
    # @retry within the run: attempt 1 continued from the checkpoint of attempt 0
    assert f"resumed from {ckpts}/step-{kills[0]}" in text, text[-5000:]
    assert f"training steps {kills[0]} -> {total}" in text

    fault_run = run_id_of(text)
    res = run_flow(["resume", "--origin-run-id", fault_run], env, timeout=900, log=flow_base / "logs" / "fault_resume.log")
    assert_ok(res, "resume")
    rtext = res.stdout + res.stderr
    assert f"resumed from {ckpts}/step-{kills[1]}" in rtext, rtext[-5000:]
    assert f"training steps {kills[1]} -> {total}" in rtext
    assert "training steps 0 ->" not in rtext
    assert "Cloning previously run task" in rtext and "/prep/" in rtext  # prep is not re-run

    # the final artifact equals the uninterrupted reference run's (same config, same init)
    from rtdmd.lora.artifact import load_lora_artifact

    got = load_lora_artifact(str(out_dir / "artifact"), backbone="toy2d")
    ref = load_lora_artifact(str(ref_base / "rl" / "artifact"), backbone="toy2d")
    assert got.manifest["steps"] == ref.manifest["steps"] == total
    assert got.manifest["parent"]["uri"] == ref.manifest["parent"]["uri"]
    for role in ("generator", "fake_score"):
        a, b = got.adapters[role].state, ref.adapters[role].state
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] - b[k]).abs().max().item() <= 1e-5 + 1e-4 * b[k].abs().max().item(), f"{role}/{k} differs"
    # the metrics stream shows no restart from step 1 after the kills
    steps = [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert steps.count(steps[0]) == 1, f"RL restarted from scratch: {steps}"


# ----------------------------------------------------------------------------- tiny_flux2
# the milestone mechanism of the paper recipe at tiny scale: RL starts from the step-2 state of a
# 4-step cold start (flux2_4b: 15000 of 100000), so the flow stops the cold start at step 2
TINY_FLUX2_FAST = ("cold_start.total_steps=4 cold_start.milestones=[2] rl.init_milestone=2 "
                   "cold_start.checkpoint.save_interval=1 cold_start.eval_interval=0 "
                   "rl.epochs=1 rl.num_batches_per_epoch=1 rl.checkpoint.save_interval=1 rl.eval_interval=0 "
                   "eval.num_prompts=2")


@pytest.fixture(scope="session")
def tiny_reward_ckpts(tmp_path_factory):
    from rtdmd.rewards.tiny import build_tiny_reward_checkpoints

    return build_tiny_reward_checkpoints(tmp_path_factory.mktemp("reward_ckpts"))


def test_tiny_flux2_full_flow_local(local_env, flow_base, tiny_reward_ckpts):
    env = {**local_env, "RTDMD_REWARD_CKPT_PATH": str(tiny_reward_ckpts)}
    res = run_flow(["run", "--backbone", "tiny_flux2", "--overrides", TINY_FLUX2_FAST, "--max-workers", "2"], env,
                   timeout=1200, log=flow_base / "logs" / "tiny_flux2_local.log")
    assert_ok(res, "tiny_flux2 flow")
    run_id = run_id_of(res.stdout + res.stderr)
    base = _run_dir(env, run_id)
    assert "cold start : runs to step 2 of 4 — the milestone RL starts from" in res.stdout + res.stderr
    milestone = base / "cold_start" / "milestones" / "step-2"
    ms = json.loads((milestone / "manifest.json").read_text())
    assert ms["milestone"] == 2 and ms["steps"] == 2 and ms["stage"] == "cold_start"
    assert not (base / "cold_start" / "artifact").exists(), "the cold start ran past the milestone RL needs"
    rl = json.loads((base / "rl" / "artifact" / "manifest.json").read_text())
    assert rl["backbone"] == "tiny_flux2" and rl["parent"]["uri"] == str(milestone)
    assert any(f.startswith("generator/") and f.endswith(".safetensors") for f in rl["files"])
    matrix = json.loads((base / "eval" / "matrix" / "matrix.json").read_text())
    assert set(matrix["scores"]) == {"teacher-8", "teacher-4", "cold_start-4", "rtdmd-4"}
    for s in matrix["scores"].values():
        assert {"clipscore", "pickscore", "aesthetic"} <= set(s)
    runs = [r for r in mlflow_runs(env, "rtdmd-tiny_flux2") if r["tags"].get("rtdmd.logical_run_id") == run_id]
    assert sum(r["tags"]["rtdmd.kind"] == "eval" for r in runs) == 4
