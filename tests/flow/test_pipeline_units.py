"""Pipeline glue without running the flow: profiles, layout, failure summaries, preflight checks."""
from __future__ import annotations

import json
import socket
import sys
import textwrap

import pytest

from rtdmd.pipeline import launch as L
from rtdmd.pipeline import profiles as PR
from rtdmd.pipeline.artifacts import ArtifactRootError, RunLayout, check_root
from rtdmd.pipeline.preflight import PreflightError, check_init_artifact, check_world_sizes, load_run_params
from rtdmd.tracking import TrackingError, check_tracking


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- profiles
def test_deploy_config_defaults_and_errors(monkeypatch):
    monkeypatch.delenv("RTDMD_PROFILE", raising=False)
    monkeypatch.delenv("RTDMD_BACKBONE", raising=False)
    d = PR.parse_deploy_config({})
    assert (d.profile, d.backbone, d.retries) == ("local", "toy2d", None)
    monkeypatch.setenv("RTDMD_PROFILE", "kubernetes")
    assert PR.parse_deploy_config(None).profile == "kubernetes"
    with pytest.raises(PR.ProfileError, match="unknown profile 'gpu'"):
        PR.parse_deploy_config({"profile": "gpu"})
    with pytest.raises(PR.ProfileError, match="unknown key"):
        PR.parse_deploy_config({"profle": "local"})
    with pytest.raises(PR.ProfileError, match="retries"):
        PR.parse_deploy_config({"retries": -1})


def test_local_profile_decorators():
    d = PR.parse_deploy_config({"profile": "local", "backbone": "toy2d"})
    decos = PR.step_decorators(d, step_names=["start", "cold_start", "rl", "eval_variant", "register"])
    assert decos["start"] == [] and decos["register"] == []
    for step in ("cold_start", "rl"):
        names = [n for n, _ in decos[step]]
        assert names == ["parallel", "retry"]
        assert dict(decos[step])["retry"] == {"times": 1, "minutes_between_retries": 0}
    assert [n for n, _ in decos["eval_variant"]] == ["retry"]
    no_retry = PR.step_decorators(PR.parse_deploy_config({"retries": 0}), step_names=["rl"])
    assert [n for n, _ in no_retry["rl"]] == ["parallel"]


def test_kubernetes_profile_decorators_follow_params():
    d = PR.parse_deploy_config({"profile": "kubernetes", "backbone": "flux2_4b", "kubernetes": {"namespace": "ml"}})
    decos = PR.step_decorators(d, step_names=["start", "rl", "eval_variant"])
    rl = dict(decos["rl"])
    assert rl["torchrun"]["nproc_per_node"] == 8
    k = rl["kubernetes"]
    assert (k["gpu"], k["cpu"], k["memory"], k["shared_memory"], k["namespace"]) == (8, 64, 960 * 1024, 64 * 1024, "ml")
    assert k["image"] == "ghcr.io/rtdmd/rtdmd:latest" and k["port"] == PR.TORCHRUN_PORT
    assert rl["retry"]["times"] == 2
    assert rl["environment"]["vars"]["RTDMD_STAGE_NODES"] == "2"
    ev = dict(decos["eval_variant"])
    assert "torchrun" not in ev and ev["kubernetes"]["gpu"] == 8 and "port" not in ev["kubernetes"]
    start = dict(decos["start"])
    assert "gpu" not in start["kubernetes"] and start["kubernetes"]["cpu"] == 2


def test_eval_must_be_single_node():
    d = PR.parse_deploy_config({"profile": "kubernetes", "backbone": "flux2_4b", "overrides": ["compute.eval.nodes=2"]})
    with pytest.raises(PR.ProfileError, match="compute.eval.nodes=2"):
        PR.stage_plans(d)


def test_layout_keys_by_logical_run_and_stage(tmp_path):
    lay = RunLayout(str(tmp_path), "RtdmdFlow", "123")
    assert lay.artifact_uri("rl") == str(tmp_path / "RtdmdFlow" / "123" / "rl" / "artifact")
    assert lay.checkpoint_dir("cold_start") == str(tmp_path / "RtdmdFlow" / "123" / "cold_start" / "checkpoints")
    s3 = RunLayout("s3://b/root", "RtdmdFlow", "123")
    assert s3.artifact_uri("cold_start") == "s3://b/root/RtdmdFlow/123/cold_start/artifact"
    assert s3.eval_dir("rtdmd-4") == "s3://b/root/RtdmdFlow/123/eval/rtdmd-4"
    with pytest.raises(ValueError):
        lay.stage_dir("train")


# ----------------------------------------------------------------------------- failure summaries
TORCHRUN_TAIL = textwrap.dedent("""\
    [rank1]: Traceback (most recent call last):
    [rank1]:   File "/x/rtdmd/train/base.py", line 10, in run
    [rank1]:     raise ValueError("rl.global_sample_batch_size=7 is not divisible by the world size 2")
    [rank1]: ValueError: rl.global_sample_batch_size=7 is not divisible by the world size 2
    E1122 00:06:52.847000 17112 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 1
    Traceback (most recent call last):
      File "/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 1142, in <module>
        main()
    torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
    ============================================================
    rtdmd.train FAILED
    ------------------------------------------------------------
    Root Cause (first observed failure):
    [0]:
      time      : 2026-11-22_00:06:52
      host      : localhost
      rank      : 1 (local_rank: 1)
      exitcode  : {code} (pid: 17127)
      error_file: <N/A>
      traceback : {tb}
    ============================================================
    """)


def test_summary_names_the_failing_ranks_exception():
    lines = TORCHRUN_TAIL.format(code=1, tb="To enable traceback see: ...").splitlines()
    s = L.summarize_failure(lines, 1)
    assert s.rank == 1 and s.exitcode == 1
    assert s.message == "ValueError: rl.global_sample_batch_size=7 is not divisible by the world size 2"


def test_summary_reports_a_killed_worker():
    lines = [ln for ln in TORCHRUN_TAIL.format(code=-9, tb="Signal 9 (SIGKILL) received by PID 17127").splitlines()
             if not ln.startswith("[rank1]")]
    s = L.summarize_failure(lines, 1)
    assert s.rank == 1 and s.exitcode == -9
    assert "killed by SIGKILL" in s.message


def test_summary_falls_back_to_error_lines():
    lines = ["python -m rtdmd.train: error: unrecognized arguments: foo=1", "something else"]
    assert "unrecognized arguments" in L.summarize_failure(lines, 2).message


@pytest.mark.slow
def test_run_stage_fails_with_the_workers_error(tmp_path, monkeypatch):
    """A real 2-process gloo torchrun: rank 1 raises, the step error carries its exception."""
    mod = tmp_path / "rtdmd_failing_worker.py"
    mod.write_text(textwrap.dedent("""\
        import os, sys, time
        import torch.distributed as dist
        dist.init_process_group("gloo")
        print(f"worker {dist.get_rank()} up", flush=True)
        if dist.get_rank() == 1:
            raise RuntimeError("reward model checkpoint missing on rank 1")
        time.sleep(60)
        """))
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    with pytest.raises(L.StageFailed) as info:
        L.run_stage("rtdmd_failing_worker", [], stage="rl", nproc_per_node=2, env=env, torch_run=False, timeout=240)
    assert "stage 'rl' failed on rank 1" in str(info.value)
    assert "RuntimeError: reward model checkpoint missing on rank 1" in str(info.value)
    ok = tmp_path / "rtdmd_ok_worker.py"
    ok.write_text("import os; print('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'])\n")
    L.run_stage("rtdmd_ok_worker", [], stage="x", nproc_per_node=2, env=env, torch_run=False, timeout=240)


def test_local_nproc_without_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert L.visible_gpus() == 0
    assert L.local_nproc(2) == (2, "gloo")
    assert L.local_nproc(2, gpus=8) == (8, "nccl")
    cmd = L.torchrun_command("rtdmd.train", ["rl", "--out", "x"], 8)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in cmd
    assert cmd[cmd.index("--nproc_per_node") + 1] == "8" and cmd[-4:] == ["rtdmd.train", "rl", "--out", "x"]


# ----------------------------------------------------------------------------- preflight
def test_params_errors_are_clear():
    with pytest.raises(PreflightError, match="unknown backbone 'flux3'"):
        load_run_params("flux3", [])
    with pytest.raises(PreflightError, match="unknown key 'rl.epochz'"):
        load_run_params("toy2d", ["rl.epochz=3"])
    params = load_run_params("toy2d", ["cold_start.global_batch_size=255"])
    with pytest.raises(PreflightError, match="not divisible by the world size 2"):
        check_world_sizes(params, {"cold_start": 2})


def test_unreachable_mlflow_and_s3_are_reported(tmp_path, monkeypatch):
    port = _free_port()
    with pytest.raises(TrackingError, match=f"127.0.0.1:{port} is unreachable"):
        check_tracking(f"http://127.0.0.1:{port}", timeout=2)
    check_tracking(f"sqlite:///{tmp_path}/m/mlflow.db")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(ArtifactRootError, match="is unreachable"):
        check_root("s3://bucket/prefix", timeout=2)


def test_missing_bucket_and_init_artifacts(tmp_path, monkeypatch):
    from rtdmd.artifacts.store import publish_dir
    from rtdmd.testing.s3server import create_bucket, local_s3_server, s3_env

    with local_s3_server() as endpoint:
        for k, v in s3_env(endpoint).items():
            monkeypatch.setenv(k, v)
        with pytest.raises(ArtifactRootError, match="bucket 'nobucket' does not exist"):
            check_root("s3://nobucket/x")
        create_bucket(endpoint, "art")
        check_root("s3://art/x")
        with pytest.raises(PreflightError, match="does not exist or is incomplete"):
            check_init_artifact("s3://art/runs/1/cold_start/artifact", backbone="toy2d", expected_stage="cold_start",
                                flag="--cold-start-uri")
        src = tmp_path / "a"
        src.mkdir()
        (src / "x.txt").write_text("x")
        publish_dir(src, "s3://art/runs/1/rl/artifact", {"kind": "rtdmd-lora", "backbone": "toy2d", "stage": "rl"})
        with pytest.raises(PreflightError, match="is a 'rl' artifact; expected a 'cold_start'"):
            check_init_artifact("s3://art/runs/1/rl/artifact", backbone="toy2d", expected_stage="cold_start",
                                flag="--cold-start-uri")
        with pytest.raises(PreflightError, match="trained for backbone 'toy2d', not 'tiny_flux2'"):
            check_init_artifact("s3://art/runs/1/rl/artifact", backbone="tiny_flux2", expected_stage="rl", flag="--rl-uri")
        assert check_init_artifact("s3://art/runs/1/rl/artifact", backbone="toy2d", expected_stage="rl",
                                   flag="--rl-uri")["stage"] == "rl"
    with pytest.raises(PreflightError, match="does not exist"):
        check_init_artifact(str(tmp_path / "nope"), backbone="toy2d", expected_stage=None, flag="--rl-uri")


def test_kubernetes_profile_plan_refuses_local_services(monkeypatch):
    from rtdmd.pipeline.plan import plan_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("RTDMD_ARTIFACT_ROOT", "s3://b/a")
    kw = dict(flow="RtdmdFlow", run_id="1", origin_run_id=None, overrides="", stages="all", cold_start_uri="",
              rl_uri="", pathspec="RtdmdFlow/1/start/1", skip_services=True)
    ctx = plan_run(backbone="flux2_4b", deploy={"profile": "kubernetes", "backbone": "flux2_4b"}, **kw)
    assert ctx.plans["rl"].nodes == 2 and ctx.world_sizes["rl"] == 16 and ctx.parent_run_id is None
    with pytest.raises(PreflightError, match="rendered for backbone 'flux2_4b'"):
        plan_run(backbone="sd35m", deploy={"profile": "kubernetes", "backbone": "flux2_4b"}, **kw)
    with pytest.raises(PreflightError, match="fixed at deploy time"):
        plan_run(backbone="flux2_4b", deploy={"profile": "kubernetes", "backbone": "flux2_4b"},
                 **{**kw, "overrides": "compute.rl.nodes=4"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    with pytest.raises(PreflightError, match="shared MLflow server"):
        plan_run(backbone="flux2_4b", deploy={"profile": "kubernetes", "backbone": "flux2_4b"}, **kw)
    with pytest.raises(PreflightError, match="--cold-start-uri"):
        plan_run(backbone="toy2d", deploy={"profile": "local"}, **{**kw, "stages": "rl,eval"})
    with pytest.raises(PreflightError, match="unknown stage"):
        plan_run(backbone="toy2d", deploy={"profile": "local"}, **{**kw, "stages": "prep,train"})


@pytest.mark.parametrize("nodes", [1, 2])
def test_torchrun_step_uses_current_torch_run_and_reports_the_workers_error(monkeypatch, capsys, nodes):
    """``@torchrun`` steps (one node or several) go through metaflow-torchrun's ``current.torch.run``
    (which streams to sys.stdout/err and raises with a bare return code): the tee still finds the
    worker's error."""
    import types

    import metaflow

    calls = {}

    class FakeTorch:
        def run(self, entrypoint=None, entrypoint_args=None, nproc_per_node=None, **kw):
            calls.update(entrypoint=entrypoint, args=entrypoint_args, nproc=nproc_per_node,
                         env=__import__("os").environ.get("MLFLOW_RUN_ID"))
            sys.stdout.write("worker 9 up\n")
            sys.stderr.write(TORCHRUN_TAIL.format(code=1, tb="To enable traceback see: ..."))
            exc = RuntimeError("Subprocess exited with return code 1")
            raise exc

    fake = types.SimpleNamespace(torch=FakeTorch(), parallel=types.SimpleNamespace(num_nodes=nodes, node_index=0))
    monkeypatch.setattr(metaflow, "current", fake)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    with pytest.raises(L.StageFailed, match="failed on rank 1, exit code 1: ValueError: rl.global_sample_batch_size=7"):
        L.run_stage("rtdmd.train", ["rl", "--out", "s3://b/x"], stage="rl", nproc_per_node=8,
                    env={"MLFLOW_RUN_ID": "abc"})
    assert calls == {"entrypoint": "--module", "args": ["rtdmd.train", "rl", "--out", "s3://b/x"], "nproc": 8, "env": "abc"}
    assert "MLFLOW_RUN_ID" not in __import__("os").environ  # the step's environment is restored
    assert "worker 9 up" in capsys.readouterr().out  # logs still reach the step's stdout


def test_plain_parallel_step_keeps_its_own_torchrun(monkeypatch):
    """Without ``@torchrun`` (the local profile's ``@parallel``) the stage runs its own single-node
    torchrun, and ``torch_run=True`` outside a ``@torchrun`` step is not silently ignored."""
    import types

    import metaflow

    from rtdmd.pipeline.errors import PipelineError

    seen = []
    monkeypatch.setattr(L, "run_streamed", lambda cmd, **kw: seen.append(list(cmd)))
    monkeypatch.setattr(metaflow, "current", types.SimpleNamespace(parallel=types.SimpleNamespace(num_nodes=1)))
    assert not L.torchrun_step()
    L.run_stage("rtdmd.train", ["rl"], stage="rl", nproc_per_node=2)
    assert seen and seen[0][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nnodes"]
    with pytest.raises(PipelineError, match="torch_run=True needs a @torchrun step"):
        L.run_stage("rtdmd.train", ["rl"], stage="rl", nproc_per_node=2, torch_run=True)


def test_flux2_4b_plan_stops_the_cold_start_at_the_rl_milestone(monkeypatch, tmp_path):
    """The paper recipe: RL starts from the step-15000 cold-start state, so the flow runs the cold
    start to 15000 of 100000 steps unless --full-cold-start true, says so, and passes --max-steps."""
    from rtdmd.pipeline import training
    from rtdmd.pipeline.plan import describe_plan, plan_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("RTDMD_ARTIFACT_ROOT", "s3://b/a")
    kw = dict(flow="RtdmdFlow", run_id="1", origin_run_id=None, overrides="", stages="all", cold_start_uri="",
              rl_uri="", pathspec="RtdmdFlow/1/start/1", skip_services=True, backbone="flux2_4b",
              deploy={"profile": "kubernetes", "backbone": "flux2_4b"})
    ctx = plan_run(**kw)
    assert ctx.init_milestone == 15000 and ctx.cold_start_stop == 15000
    assert "runs to step 15000 of 100000 — the milestone RL starts from" in describe_plan(ctx)
    full = plan_run(**kw, full_cold_start=True)
    assert full.cold_start_stop is None and "all 100000 steps" in describe_plan(full)
    seen = {}
    monkeypatch.setattr(training.L, "run_stage", lambda module, args, **k: seen.setdefault("args", args))
    monkeypatch.setattr(training, "verify_artifact", lambda uri: seen.setdefault("uri", uri) and {"steps": 15000})

    class _Tr:
        def __getattr__(self, name):
            return lambda *a, **k: "run"

    monkeypatch.setattr(type(ctx), "tracker", lambda self: _Tr())
    monkeypatch.setattr(training, "_log_stage_files", lambda *a, **k: None)
    out = training.run_training(ctx, "cold_start", init_uri=None, prep=None, pathspec="p")
    assert seen["args"][-2:] == ["--max-steps", "15000"]
    assert seen["uri"].endswith("/cold_start/milestones/step-15000") and out["uri"] == seen["uri"]
    with pytest.raises(Exception, match="rl.init_milestone=3 is not one of cold_start.milestones"):
        plan_run(**{**kw, "overrides": "rl.init_milestone=3"})


def test_stage_runs_log_the_prepared_datasets_with_their_dvc_version(monkeypatch, tmp_path):
    """A training stage run and an evaluation run get the prepared prompt sets they read as MLflow
    dataset inputs: source = the published directory, digest = the DVC md5, context, prompt count."""
    from rtdmd.pipeline import training
    from rtdmd.pipeline.datasets import log_prepared, stage_datasets
    from rtdmd.pipeline.plan import plan_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("RTDMD_ARTIFACT_ROOT", str(tmp_path / "art"))
    ctx = plan_run(flow="RtdmdFlow", run_id="7", origin_run_id=None, overrides="", stages="all", cold_start_uri="",
                   rl_uri="", pathspec="RtdmdFlow/7/start/1", backbone="toy2d",
                   deploy={"profile": "local", "backbone": "toy2d"})
    md5 = "0123456789abcdef0123456789abcdef.dir"
    prep = {"uri": str(tmp_path / "art" / "prep"), "data_version": "sha256:feedfacefeedface",
            "counts": {"toy2d": {"train": 4, "test": 4}, "unused": {"train": 9, "test": 0}},
            "dvc": {"md5": md5, "commit": "abc123", "path": "data/prompts"}}
    monkeypatch.setattr(training.L, "run_stage", lambda *a, **k: None)
    monkeypatch.setattr(training, "verify_artifact", lambda uri: {"steps": 1})
    monkeypatch.setattr(training, "prompt_overrides", lambda *a, **k: [])
    out = training.run_training(ctx, "cold_start", init_uri=None, prep=prep, pathspec="p")
    tr = ctx.tracker()
    (inp,) = tr.get_run(out["mlflow_run_id"]).inputs.dataset_inputs
    assert inp.dataset.name == "toy2d/train" and inp.dataset.digest == md5
    assert inp.dataset.source_type == "local" and json.loads(inp.dataset.source)["uri"] == prep["uri"] + "/prompts/toy2d"
    assert json.loads(inp.dataset.profile) == {"num_prompts": 4, "split": "train"}
    tags = {t.key: t.value for t in inp.tags}
    assert tags["mlflow.data.context"] == "training" and tags["rtdmd.dvc.commit"] == "abc123"
    assert tags["rtdmd.data_version"] == prep["data_version"]

    eval_run = tr.eval_run(ctx.parent_run_id, ctx.logical_run_id, "teacher-4")
    log_prepared(tr, eval_run, prep, "test", stage_datasets(ctx.params, "eval"))
    (inp,) = tr.get_run(eval_run).inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.digest) == ("toy2d/test", md5)
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "evaluation"
