"""DVC: repro is a no-op the second time and re-runs on a param change; push/pull round-trips to a
local remote and to an S3-compatible server on 127.0.0.1; data versions at a git revision.

Every test works on a temporary copy of a tiny git+DVC project built in the test session
(``dvc_template`` in conftest.py), never on the repository itself.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from data_helpers import run, tool_env
from rtdmd.data import dvc_access, formats
from rtdmd.testing.s3server import create_bucket, s3_env

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_repro_noop_then_param_change_and_data_versions(dvc_project):
    """One prepare run here (plus the template's): no-op repro, param-driven re-run, and the data
    version of each commit read back through dvc_access (dvc.lock md5, dvc.api at a revision)."""
    env = tool_env()
    manifest = dvc_project / "prepared" / "manifest.json"
    before = manifest.read_bytes()
    lock_before = (dvc_project / "dvc.lock").read_text()
    res = run(["dvc", "repro"], dvc_project)
    assert "Running stage" not in res.stdout and "up to date" in res.stdout.lower()
    assert manifest.read_bytes() == before and (dvc_project / "dvc.lock").read_text() == lock_before
    # an untracked key of the same params file does not invalidate the stage
    params = dvc_project / "data.yaml"
    params.write_text(params.read_text() + "validation: {report_examples: 3}\n")
    assert "Running stage" not in run(["dvc", "repro"], dvc_project).stdout

    # v1 committed: its data version
    run(["git", "add", "-A"], dvc_project, env)
    run(["git", "commit", "-q", "-m", "v1"], dvc_project, env)
    v1 = dvc_access.data_version("prepared", repo=dvc_project, rev="HEAD")
    out = yaml.safe_load(lock_before)["stages"]["prepare"]["outs"][0]
    assert v1["md5"] == out["md5"] and v1["stage"] == "prepare" and v1["tracked_by"] == "dvc.lock"
    assert len(v1["commit"]) == 40 and v1["nfiles"] == out["nfiles"]
    assert v1["manifest_data_version"] == formats.read_manifest(dvc_project / "prepared")["data_version"]
    member = dvc_access.data_version(dvc_project / "prepared" / "gv" / "test.jsonl", repo=dvc_project)
    assert member["member"] == "gv/test.jsonl" and member["md5"] == v1["md5"] and member["commit"] == v1["commit"]
    old_text = dvc_access.read_at("prepared/gv/test.jsonl", repo=dvc_project, rev=v1["commit"])
    assert len(old_text.splitlines()) == 2  # eval_cap 2

    # a tracked param change re-runs the stage
    params.write_text(params.read_text().replace("eval_cap: 2", "eval_cap: 3"))
    assert "prepare" in run(["dvc", "status"], dvc_project).stdout
    res = run(["dvc", "repro"], dvc_project)
    assert "Running stage 'prepare'" in res.stdout
    assert json.loads(manifest.read_text())["params"]["datasets"]["gv"]["eval_cap"] == 3
    lock = yaml.safe_load((dvc_project / "dvc.lock").read_text())
    assert lock["stages"]["prepare"]["params"]["data.yaml"]["datasets"]["gv"]["eval_cap"] == 3

    # v2 committed: new version; v1 still readable at its revision (from the DVC cache)
    run(["git", "add", "-A"], dvc_project, env)
    run(["git", "commit", "-q", "-m", "v2"], dvc_project, env)
    v2 = dvc_access.data_version("prepared", repo=dvc_project)
    assert v2["md5"] != v1["md5"] and v2["commit"] != v1["commit"]
    with dvc_access.open_at("prepared/gv/test.jsonl", repo=dvc_project, rev=v1["commit"]) as fh:
        assert fh.read() == old_text
    assert len(dvc_access.read_at("prepared/gv/test.jsonl", repo=dvc_project).splitlines()) == 3
    assert dvc_access.data_version("prepared", repo=dvc_project, rev=v1["commit"])["md5"] == v1["md5"]

    # `dvc add`-tracked files are found through their .dvc file
    (dvc_project / "ckpt.bin").write_bytes(b"\x00" * 64)
    run(["dvc", "add", "-q", "ckpt.bin"], dvc_project, env)
    rec = dvc_access.data_version("ckpt.bin", repo=dvc_project)
    assert rec["tracked_by"] == "ckpt.bin.dvc" and rec["size"] == 64
    with pytest.raises(dvc_access.DataVersionError, match="not tracked by DVC"):
        dvc_access.data_version("src/txt/train.txt", repo=dvc_project)
    with pytest.raises(dvc_access.DataVersionError, match="unknown git revision"):
        dvc_access.data_version("prepared", repo=dvc_project, rev="no-such-rev")


def _pull_round_trip(project: Path, env: dict, remote: str | None = None, push: bool = True):
    before = _tree(project / "prepared")
    extra = ["-r", remote] if remote else []
    if push:
        assert "pushed" in run(["dvc", "push", *extra], project, env).stdout
    shutil.rmtree(project / "prepared")
    shutil.rmtree(project / ".dvc" / "cache")
    run(["dvc", "pull", *extra], project, env)
    assert _tree(project / "prepared") == before
    formats.read_manifest(project / "prepared")  # sha256 of every file still verifies


def test_push_pull_local_remote(dvc_project, tmp_path):
    run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], dvc_project)
    _pull_round_trip(dvc_project, tool_env())
    assert any((tmp_path / "remote").rglob("*"))


def test_push_pull_s3_remote(dvc_project, s3_server):
    """The committed config names only the bucket; endpoint and credentials come from the env."""
    create_bucket(s3_server, "rtdmd-dvc")
    run(["dvc", "remote", "add", "s3", "s3://rtdmd-dvc/cache"], dvc_project)
    config = (dvc_project / ".dvc" / "config").read_text()
    assert "endpointurl" not in config and "secret" not in config
    env = tool_env(s3_env(s3_server))
    _pull_round_trip(dvc_project, env, remote="s3")
    # the same through an explicit, uncommitted endpoint (config.local) instead of AWS_ENDPOINT_URL*
    env2 = {k: v for k, v in env.items() if not k.startswith(("AWS_ENDPOINT_URL", "METAFLOW_S3"))}
    run(["dvc", "remote", "modify", "--local", "s3", "endpointurl", s3_server], dvc_project)
    assert "endpointurl" not in (dvc_project / ".dvc" / "config").read_text()
    _pull_round_trip(dvc_project, env2, remote="s3", push=False)


def test_repository_pipeline_is_well_formed():
    """The repo's dvc.yaml names the four stages; big outs are cached (not git), prompts are not."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = spec["stages"]
    assert set(stages) >= {"builtin_prompts", "prepare", "toy2d_teacher", "tiny_reward_ckpts"}
    assert stages["builtin_prompts"]["outs"] == [{"data/prompts": {"cache": False}}]
    for name in ("prepare", "toy2d_teacher", "tiny_reward_ckpts"):
        assert all(isinstance(o, str) for o in stages[name]["outs"]), name  # cached by DVC, git-ignored
    config = (ROOT / ".dvc" / "config").read_text()
    assert "remote = local" in config and "s3://" in config
    assert "access_key" not in config and "secret" not in config and "endpointurl" not in config
    lock = ROOT / "dvc.lock"
    if lock.is_file():
        locked = yaml.safe_load(lock.read_text())["stages"]
        assert {"builtin_prompts", "prepare"} <= set(locked)


def test_dirty_workspace_refused_with_one_line(dvc_project):
    """Hand-edited outputs are refused with one line naming the files and the fix (nothing is
    overwritten); after the suggested command the workspace is clean."""
    edited = dvc_project / "prepared" / "gv" / "test.jsonl"
    edited.write_text(edited.read_text() + '{"prompt": "edited by hand"}\n')
    (dvc_project / "prepared" / "extra.txt").write_text("not versioned\n")
    cmd = [sys.executable, "-m", "rtdmd.data.dvc_workspace", "prepare"]
    res = run(cmd, dvc_project, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: dirty DVC workspace: prepared/gv/test.jsonl modified, prepared/extra.txt untracked vs dvc.lock"), lines
    assert "`dvc commit prepare`" in lines[0] and "`dvc checkout --force prepared`" in lines[0]
    assert "edited by hand" in edited.read_text() and (dvc_project / "prepared" / "extra.txt").is_file()

    run(["dvc", "checkout", "--force", "prepared"], dvc_project)  # the fix the message names
    res = run([*cmd[:-1], "--check-only", "prepare"], dvc_project)
    assert res.stdout.startswith("clean: prepare") and "edited by hand" not in edited.read_text()


class _Tracker:
    def __init__(self):
        self.tags: dict[str, dict] = {}

    def stage_run(self, parent, logical, stage, tags=None, params=None):
        return f"run-{stage}"

    def set_tags(self, run_id, tags):
        self.tags.setdefault(run_id, {}).update({k: v for k, v in tags.items() if v is not None})

    def log_metrics(self, run_id, metrics):
        pass

    def finish(self, run_id, status="FINISHED"):
        self.tags.setdefault(run_id, {})["status"] = status


def test_flow_prep_uses_dvc_and_records_reward_checkpoint_versions(dvc_project, tmp_path, monkeypatch):
    """The flow's prep step reproduces the DVC stage, publishes it, and tags the data version and the
    version (md5 of the .dvc file / dvc.lock out) of every reward checkpoint under
    $RTDMD_REWARD_CKPT_PATH; a dirty workspace fails the step with the one-line message."""
    from types import SimpleNamespace

    from rtdmd.artifacts.fs import verify_manifest
    from rtdmd.pipeline import training
    from rtdmd.pipeline.context import StageError

    rewards = dvc_project / "rewards"
    (rewards / "real" / "PickScore_v1").mkdir(parents=True)
    (rewards / "real" / "PickScore_v1" / "model.safetensors").write_bytes(b"\x01" * 32)
    run(["dvc", "add", "-q", "rewards/real"], dvc_project)  # what the README's `dvc add` / `dvc import-url` write
    md5 = yaml.safe_load((rewards / "real.dvc").read_text())["outs"][0]["md5"]
    monkeypatch.setenv("RTDMD_REPO_ROOT", str(dvc_project))
    monkeypatch.setenv("RTDMD_REWARD_CKPT_PATH", str(rewards))
    tracker = _Tracker()
    layout = SimpleNamespace(artifact_uri=lambda stage: str(tmp_path / "art" / stage))
    ctx = SimpleNamespace(layout=lambda: layout, tracker=lambda: tracker, parent_run_id="parent",
                          logical_run_id="1", tags=lambda pathspec, stage: {})
    info = training.run_prep(ctx, "RtdmdFlow/1/prep/2")
    lock = yaml.safe_load((dvc_project / "dvc.lock").read_text())["stages"]["prepare"]["outs"][0]
    assert info["dvc"]["md5"] == lock["md5"] and info["reward_ckpts"] == {"rewards/real": md5}
    tags = tracker.tags["run-prep"]
    assert tags["rtdmd.dvc.md5"] == lock["md5"] and tags["rtdmd.reward_ckpt.rewards/real"] == md5
    assert tracker.tags["parent"]["rtdmd.reward_ckpt.rewards/real"] == md5
    manifest = verify_manifest(tmp_path / "art" / "prep")
    assert manifest["dvc"]["md5"] == lock["md5"] and manifest["reward_ckpts"] == {"rewards/real": md5}

    (rewards / "real" / "PickScore_v1" / "model.safetensors").write_bytes(b"\x02" * 32)
    with pytest.raises(StageError, match=r"^prep: dirty DVC workspace: rewards/real/PickScore_v1/model.safetensors "
                                         r"modified vs dvc.lock .*`dvc add rewards/real`"):
        training.run_prep(ctx, "RtdmdFlow/1/prep/3")


def test_repository_reward_checkpoints_have_dvc_versions():
    """The tiny reward checkpoints are a DVC stage out: their version is dvc.lock's md5."""
    from rtdmd.data.dvc_workspace import tracked_targets, tracked_versions

    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]["tiny_reward_ckpts"]["outs"][0]
    versions = tracked_versions(ROOT / "data" / "reward_ckpts", ROOT)
    assert versions["data/reward_ckpts/tiny"] == lock["md5"]
    assert tracked_versions(ROOT / "data" / "reward_ckpts" / "tiny" / "x", ROOT) == {"data/reward_ckpts/tiny": lock["md5"]}
    assert "tiny_reward_ckpts" in tracked_targets(ROOT / "data" / "reward_ckpts", ROOT)
