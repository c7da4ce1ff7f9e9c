"""Bad inputs and faults across entry points: each asserts exit status, message, and that nothing was lost.

Entry points: params loading (``rtdmd params show``), ``python -m rtdmd.train``, ``rtdmd lora import``,
``python -m rtdmd.data.prepare``, ``python -m rtdmd.infer``, artifact / checkpoint / prepared-data
readers. Lock tests use a real second process holding the lock.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import pytest
import torch

from .helpers import (FAST, ROOT, child_env, cli, hold_lock_process, metric_steps, reference_pt, snapshot, train,
                      trained_like_artifact)


# ---- params ------------------------------------------------------------------------------------
def _params_file(tmp_path, extra: str, base: bool = True):
    p = tmp_path / "p.yaml"
    p.write_bytes(((ROOT / "params" / "toy2d.yaml").read_text() if base else "").encode() + extra.encode())
    return p


@pytest.mark.parametrize("text, needle", [
    ("\ncold_start:\n  total_steps: 3\n", "duplicate key 'cold_start'"),
    ("\nextra: &x 1\nother: *x\n", "alias '*x' is not allowed"),
    ("\nsamplr: {}\n", "unknown key 'samplr'"),
])
def test_params_file_problems_are_one_line(tmp_path, capsys, text, needle):
    p = _params_file(tmp_path, text)
    rc, out, err = cli(capsys, "params", "show", p)
    assert rc == 2 and needle in err and str(p) in err and len(err.strip().splitlines()) == 1 and not out


def test_params_file_that_is_not_utf8_or_not_a_mapping(tmp_path, capsys):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"name: \xff\xfe\x00toy\n")
    rc, _, err = cli(capsys, "params", "show", p)
    assert rc == 2 and str(p) in err and len(err.strip().splitlines()) == 1
    p.write_text("- a\n- b\n")
    rc, _, err = cli(capsys, "params", "show", p)
    assert rc == 2 and "top level must be a mapping" in err


def test_huge_wrong_value_is_quoted_in_bounded_form(tmp_path, capsys):
    from rtdmd.config import ConfigError, load_params

    with pytest.raises(ConfigError) as e:
        load_params("toy2d", ["cold_start.prompts=[" + ",".join(["123456789"] * 20000) + "]"])
    assert "cold_start.prompts" in str(e.value) and len(str(e.value)) < 300


@pytest.mark.parametrize("override", ["cold_start.generator.betas=[.nan, 0.99]", "sampler.eta=.nan",
                                      "cold_start.fake_score.lr=-.inf"])
def test_non_finite_numbers_anywhere_are_refused(override):
    from rtdmd.config import ConfigError, load_params

    with pytest.raises(ConfigError, match="finite"):
        load_params("toy2d", [override])


# ---- exclusive outputs -------------------------------------------------------------------------
def test_training_refused_while_a_live_process_holds_the_out(tmp_path, capsys):
    out = tmp_path / "o"
    holder = hold_lock_process(out)
    try:
        rc, err = train(capsys, out)
    finally:
        holder.kill()
        holder.wait()
    assert rc == 2 and f"pid {holder.pid}" in err and "(holder)" in err and "in use by" in err
    assert not out.exists()  # nothing written


def test_stale_lock_of_a_killed_process_is_reported_and_taken_over(tmp_path, capsys):
    out = tmp_path / "o"
    holder = hold_lock_process(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    rc, err = train(capsys, out)
    assert rc == 0, err
    assert "stale lock" in err and f"pid {holder.pid}" in err
    assert not (tmp_path / ".o.lock").exists()  # released on exit


def test_lock_from_another_host_is_refused_with_the_path_to_delete(tmp_path, capsys):
    out = tmp_path / "o"
    (tmp_path / ".o.lock").write_text(json.dumps({"owner": "bob", "host": socket.gethostname() + "-other",
                                                  "pid": 1, "started": "2026-01-01T00:00:00+00:00",
                                                  "command": "rtdmd.train rl"}))
    rc, err = train(capsys, out)
    assert rc == 2 and "bob@" in err and str(tmp_path / ".o.lock") in err and "delete" in err
    assert (tmp_path / ".o.lock").exists()


def test_unrefreshed_lock_from_another_host_is_stale(tmp_path, capsys):
    import os
    import time

    lock = tmp_path / ".o.lock"
    lock.write_text(json.dumps({"owner": "bob", "host": "gone-pod-7", "pid": 1, "command": "rtdmd.train rl"}))
    old = time.time() - 3600  # a preempted pod's lock, not refreshed for an hour
    os.utime(lock, (old, old))
    rc, err = train(capsys, tmp_path / "o")
    assert rc == 0, err
    assert "stale lock" in err and "gone-pod-7" in err and not lock.exists()


def test_lock_is_released_after_a_failed_run(tmp_path, capsys):
    out = tmp_path / "o"
    rc, _ = train(capsys, out)
    assert rc == 0
    rc, err = train(capsys, out, overrides=FAST + ["cold_start.generator.lr=0.5"])  # config changed -> refused
    assert rc == 2 and "--allow-config-change" in err
    assert not (tmp_path / ".o.lock").exists()
    assert metric_steps(out) == [1, 2, 3, 4]


def test_lora_import_and_prepare_refused_while_out_is_locked(tmp_path, capsys):
    from rtdmd.data import prepare

    reference_pt(tmp_path / "generator_ema.pt")
    holder = hold_lock_process(tmp_path / "art")
    try:
        rc, _, err = cli(capsys, "lora", "import", tmp_path / "generator_ema.pt", "--backbone", "toy2d",
                         "--out", tmp_path / "art")
        assert rc == 2 and "in use by" in err
        holder2 = hold_lock_process(tmp_path / "prep")
        try:
            (tmp_path / "src" / "ds").mkdir(parents=True)
            (tmp_path / "src" / "ds" / "test.txt").write_text("a red cat on a mat\n")
            capsys.readouterr()
            rc = prepare.main(["--source", str(tmp_path / "src"), "--out", str(tmp_path / "prep")])
            assert rc == 1 and "in use by" in capsys.readouterr().err
        finally:
            holder2.kill()
    finally:
        holder.kill()
    assert not (tmp_path / "art").exists() and not (tmp_path / "prep").exists()


# ---- prepare outputs -----------------------------------------------------------------------------
def _src(tmp_path):
    (tmp_path / "src" / "ds").mkdir(parents=True, exist_ok=True)
    (tmp_path / "src" / "ds" / "test.txt").write_text("a red cat on a mat\na blue dog in a car\n")
    return ["--source", str(tmp_path / "src")]


def test_prepare_refuses_foreign_dir_replaces_own_and_force_is_atomic(tmp_path, capsys):
    from rtdmd.data import prepare

    foreign = tmp_path / "out"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    capsys.readouterr()
    assert prepare.main([*_src(tmp_path), "--out", str(foreign)]) == 1
    err = capsys.readouterr().err
    assert "not a prepared prompt directory written by this command" in err and "--force" in err
    assert snapshot(foreign) == {"thesis.tex": b"keep me"}
    assert prepare.main([*_src(tmp_path), "--out", str(foreign), "--force"]) == 0
    assert not (foreign / "thesis.tex").exists() and (foreign / "manifest.json").is_file()
    assert prepare.main([*_src(tmp_path), "--out", str(foreign)]) == 0  # re-run over its own output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp/old/lock left


def test_prepare_force_replaces_a_file_without_leftovers(tmp_path, capsys):
    from rtdmd.data import prepare

    f = tmp_path / "out"
    f.write_text("old")
    assert prepare.main([*_src(tmp_path), "--out", str(f), "--force"]) == 0
    assert f.is_dir() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# ---- manifests: path safety everywhere a manifest is read -----------------------------------------
@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "generator/../../x", "a\\b", "./a", ""])
def test_artifact_manifest_with_unsafe_path_is_refused(tmp_path, bad):
    from rtdmd.artifacts.fs import ArtifactError
    from rtdmd.lora.artifact import load_lora_artifact

    art = trained_like_artifact(tmp_path / "art")
    m = json.loads((art / "manifest.json").read_text())
    m["files"][bad] = {"sha256": "0" * 64, "bytes": 0}
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="unsafe path"):
        load_lora_artifact(str(art))


def test_manifest_that_is_not_an_object_is_refused(tmp_path):
    from rtdmd.artifacts.fs import ArtifactError, verify_manifest

    art = trained_like_artifact(tmp_path / "art")
    (art / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="JSON object"):
        verify_manifest(art)


def test_prepared_data_manifest_with_traversal_is_refused(tmp_path, capsys):
    from rtdmd.data import formats, prepare

    out = tmp_path / "prep"
    assert prepare.main([*_src(tmp_path), "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    m["files"]["../../outside.jsonl"] = {"sha256": "0" * 64, "bytes": 0, "rows": 0}
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(formats.PromptFormatError, match="unsafe path"):
        formats.read_manifest(out)


# ---- checkpoints -----------------------------------------------------------------------------------
def _two_checkpoints(tmp_path, capsys):
    out = tmp_path / "o"
    over = [o for o in FAST if "total_steps" not in o] + ["cold_start.total_steps=6"]
    rc, err = train(capsys, out, "--max-steps", "4", overrides=over)
    assert rc == 0, err
    return out, over


def test_every_checkpoint_corrupt_restarts_from_zero_with_warnings(tmp_path, capsys):
    out, over = _two_checkpoints(tmp_path, capsys)
    for step in (2, 4):
        (out / "checkpoints" / f"step-{step}" / "state.json").write_text("{}")
    rc, err = train(capsys, out, overrides=over)
    assert rc == 0, err
    assert err.count("quarantined") == 2 and "resumed from" not in err
    assert len(list((out / "checkpoints").glob("step-*.corrupt-*"))) == 2
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6]


def test_edited_manifest_fails_its_complete_marker_and_is_quarantined(tmp_path, capsys):
    out, over = _two_checkpoints(tmp_path, capsys)
    man = out / "checkpoints" / "step-4" / "manifest.json"
    man.write_text(man.read_text().replace('"step": 4', '"step": 5'))
    rc, err = train(capsys, out, overrides=over)
    assert rc == 0 and "COMPLETE marker" in err and "step-2" in err
    assert (out / "artifact" / "manifest.json").is_file()


def test_checkpoint_manifest_with_unsafe_path_is_quarantined(tmp_path, capsys):
    out, over = _two_checkpoints(tmp_path, capsys)
    d = out / "checkpoints" / "step-4"
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["../../x"] = {"sha256": "0" * 64, "bytes": 0}
    (d / "manifest.json").write_text(json.dumps(m))
    rc, err = train(capsys, out, overrides=over)
    assert rc == 0 and "unsafe path" in err and f"resumed from {out / 'checkpoints'}/step-2" in err


def test_checkpoint_saves_are_byte_deterministic_and_quarantine_survives_pruning(tmp_path):
    from rtdmd.train.checkpoint import CheckpointStore

    tens = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float64)}
    state = {"z": 1, "a": [1.5, "x"], "step": 1}
    s1, s2 = CheckpointStore(str(tmp_path / "c1"), keep_last=1), CheckpointStore(str(tmp_path / "c2"), keep_last=1)
    s1.save(1, tens, state)
    s2.save(1, dict(reversed(list(tens.items()))), dict(reversed(list(state.items()))))
    assert snapshot(tmp_path / "c1") == snapshot(tmp_path / "c2")
    where = s1.quarantine(1)
    s1.save(2, tens, state)
    s1.save(3, tens, state)
    assert s1.complete_steps() == [3] and (tmp_path / "c1" / where.split("/")[-1]).is_dir()


def test_torn_or_later_metric_rows_are_dropped_on_resume(tmp_path, capsys):
    out, over = _two_checkpoints(tmp_path, capsys)
    with open(out / "metrics.jsonl", "a") as f:  # rows of a run killed after step 4, and a torn line
        f.write(json.dumps({"step": 5, "x": 1.0}) + "\n" + '{"step": 6, "x"')
    rc, err = train(capsys, out, overrides=over)
    assert rc == 0, err
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6]


def test_killed_before_first_checkpoint_rerun_has_no_duplicate_rows(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "x": 0.0}) + "\n" for s in (1, 2, 3)))
    rc, err = train(capsys, out)
    assert rc == 0, err
    assert metric_steps(out) == [1, 2, 3, 4]


def test_rerun_of_a_finished_run_adds_no_rows(tmp_path, capsys):
    out = tmp_path / "o"
    assert train(capsys, out)[0] == 0
    before = (out / "metrics.jsonl").read_bytes()
    rc, err = train(capsys, out)
    assert rc == 0, err
    assert (out / "metrics.jsonl").read_bytes() == before


# ---- train CLI numbers ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-3", "1000000000000"])
def test_train_max_steps_bounds(tmp_path, capsys, value):
    rc, err = train(capsys, tmp_path / "o", "--max-steps", value)
    assert rc == 2 and f"--max-steps {value}" in err and "expected" in err
    assert not (tmp_path / "o").exists()


def test_train_missing_params_file(tmp_path, capsys):
    from rtdmd.train.__main__ import main

    rc = main(["cold_start", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "params file not found" in err and "Traceback" not in err


# ---- lora import ------------------------------------------------------------------------------------
def test_lora_import_refuses_integer_tensors_huge_alpha_and_file_out(tmp_path, capsys):
    pt = tmp_path / "generator_ema.pt"
    state = reference_pt(pt)
    torch.save({**state, "in_proj.lora_A.default.weight": torch.ones(4, 50, dtype=torch.int64)}, tmp_path / "int.pt")
    f = tmp_path / "file"
    f.write_text("mine")
    for argv, needle in [([tmp_path / "int.pt", "--out", tmp_path / "o1"], "floating point"),
                         ([pt, "--alpha", "1e9", "--out", tmp_path / "o2"], "--alpha"),
                         ([pt, "--out", f], "is an existing file")]:
        rc, _, err = cli(capsys, "lora", "import", *argv, "--backbone", "toy2d")
        assert rc == 2 and needle in err, err
    assert f.read_text() == "mine" and not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_lora_reimport_over_its_own_output_is_allowed(tmp_path, capsys):
    pt = tmp_path / "generator_ema.pt"
    reference_pt(pt)
    for seed in (0, 1):
        reference_pt(pt, seed=seed)
        rc, _, err = cli(capsys, "lora", "import", pt, "--backbone", "toy2d", "--out", tmp_path / "art")
        assert rc == 0, err
    from rtdmd.lora.artifact import load_lora_artifact

    assert load_lora_artifact(str(tmp_path / "art")).manifest["sources"]["generator"]["file"] == pt.name


# ---- infer numbers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [(["--guidance", "inf"], "--guidance inf"), (["--seed", "-1"], "--seed -1"),
                                          (["--steps", "0"], "--steps 0")])
def test_infer_numbers_are_bounded(tmp_path, capsys, argv, needle):
    from rtdmd.infer import main

    rc = main(["--config", "toy2d", "--prompt", "ring", "--out", str(tmp_path / "s"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and not (tmp_path / "s").exists()


def test_cli_processes_exit_2_without_traceback_for_user_errors(tmp_path):
    """Real processes: the exit status and the single message line survive the interpreter exit."""
    bomb = tmp_path / "b.yaml"
    bomb.write_text("a: &a [1]\nb: *a\n")
    res = subprocess.run([sys.executable, "-m", "rtdmd.cli", "params", "show", str(bomb)], cwd=ROOT, env=child_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "alias" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("argv, needle", [(["--samples-per-prompt", "100000000"], "--samples-per-prompt 100000000"),
                                          (["--batch-size", "-2"], "--batch-size -2")])
def test_eval_numbers_are_bounded(tmp_path, capsys, argv, needle):
    from rtdmd.eval.__main__ import main

    rc = main(["--config", "toy2d", "--variant", "t=teacher", "--out", str(tmp_path / "e"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "expected" in err and not (tmp_path / "e").exists()
