"""The eight findings of the fault-injection audit, one test each (each failed before the fix).

1 concurrent runs on one --out; 2 lora import over a trained artifact; 3 prepare over a file;
4 YAML alias bomb + duplicate keys; 5 non-finite / malformed values; 6 the flow start's given
artifact (checksums, path safety); 7 corrupt checkpoint fallback, full disk / read-only --out,
duplicate metric rows, re-saved LoRA bytes; 8 SIGTERM -> checkpoint of the last finished step.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time

import pytest

from .helpers import (FAST, ROOT, child_env, cli, metric_steps, reference_pt, snapshot, train, train_cmd,
                      trained_like_artifact, wait_for)


# 1 -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_1_second_run_on_same_out_fails_at_once_naming_the_owner(tmp_path, capsys):
    out = tmp_path / "run"
    longer = [o for o in FAST if "total_steps" not in o] + ["cold_start.total_steps=40"]
    first = subprocess.Popen(train_cmd(out, *longer, "cold_start.seed=1"), cwd=ROOT, env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0,
                        300, first), first.stderr.read() if first.poll() is not None else "no progress"
        t0 = time.time()
        rc, err = train(capsys, out, overrides=longer + ["cold_start.seed=2"])
        assert rc == 2 and time.time() - t0 < 30
        assert "in use by" in err and f"pid {first.pid}" in err and "Traceback" not in err
        assert first.wait(600) == 0, first.stderr.read()[-2000:]
    finally:
        first.kill()
    params = json.loads((out / "params.json").read_text())
    assert params["cold_start"]["seed"] == 1  # the first run's, not a mix
    assert metric_steps(out) == list(range(1, 41))
    assert not list(tmp_path.glob(".run.lock"))  # released on exit


# 2 -------------------------------------------------------------------------------------------
def test_2_lora_import_does_not_replace_a_trained_artifact(tmp_path, capsys):
    art = trained_like_artifact(tmp_path / "art")
    before = snapshot(art)
    reference_pt(tmp_path / "generator_ema.pt")
    rc, _, err = cli(capsys, "lora", "import", tmp_path / "generator_ema.pt", "--backbone", "toy2d", "--out", art)
    assert rc == 2 and "already exists" in err and "--force" in err
    assert snapshot(art) == before and (art / "fake_score").is_dir()
    # --force replaces it, atomically, with a complete imported artifact
    rc, _, err = cli(capsys, "lora", "import", tmp_path / "generator_ema.pt", "--backbone", "toy2d", "--out", art,
                     "--force")
    assert rc == 0, err
    assert json.loads((art / "manifest.json").read_text())["stage"] == "imported"
    assert not (art / "fake_score").exists() and not list(tmp_path.glob(".art.*"))


# 3 -------------------------------------------------------------------------------------------
def test_3_prepare_does_not_delete_an_existing_file(tmp_path, capsys):
    from rtdmd.data import prepare

    (tmp_path / "src" / "ds").mkdir(parents=True)
    (tmp_path / "src" / "ds" / "test.txt").write_text("a red cat on a mat\na blue dog in a car\n")
    victim = tmp_path / "notes.txt"
    victim.write_text("precious\n")
    capsys.readouterr()
    rc = prepare.main(["--source", str(tmp_path / "src"), "--out", str(victim)])
    err = capsys.readouterr().err
    assert rc != 0 and "is an existing file" in err and "--force" in err
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "src"]


# 4 -------------------------------------------------------------------------------------------
BOMB = "[" + ", ".join(['&a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
                       + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]) + "]"


def test_4_yaml_alias_bomb_is_refused_fast_with_a_short_message(tmp_path, capsys):
    """< 1 KB: nine levels of nine aliases (9⁹ leaves) under the typed key ``cold_start.prompts``."""
    assert len(BOMB) < 1024
    text = (ROOT / "params" / "toy2d.yaml").read_text()
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(text.replace("  prompts: data/prompts/toy2d\n", f"  prompts: {BOMB}\n", 1))
    t0 = time.time()
    rc, _, err = cli(capsys, "params", "show", bomb)
    assert rc == 2 and time.time() - t0 < 10
    assert "alias" in err and str(bomb) in err and len(err) < 400
    rc, err = train(capsys, tmp_path / "o", overrides=FAST + [f"cold_start.prompts={BOMB}"])
    assert rc == 2 and "override 'cold_start.prompts'" in err and "alias" in err and len(err) < 400
    assert time.time() - t0 < 20 and not (tmp_path / "o").exists()


def test_4_duplicate_yaml_keys_are_refused(tmp_path, capsys):
    text = (ROOT / "params" / "toy2d.yaml").read_text()
    dup = tmp_path / "dup.yaml"
    dup.write_text(text + "\nsampler:\n  eta: 0.5\n")
    rc, _, err = cli(capsys, "params", "show", dup)
    assert rc == 2 and "duplicate key 'sampler'" in err and str(dup) in err


# 5 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999", "1" + "0" * 400])
def test_5_non_finite_lr_is_refused_before_training(tmp_path, capsys, value):
    rc, err = train(capsys, tmp_path / "o", overrides=FAST + [f"cold_start.generator.lr={value}"])
    assert rc == 2 and "cold_start.generator.lr" in err and "finite" in err
    assert not (tmp_path / "o").exists()


def test_5_lora_import_refuses_nan_weights_wrong_shapes_and_bad_alpha(tmp_path, capsys):
    reference_pt(tmp_path / "nan" / "generator_ema.pt", fill=float("nan"))
    reference_pt(tmp_path / "shape" / "generator_ema.pt", modules={"in_proj": (49, 128)})
    reference_pt(tmp_path / "ok" / "generator_ema.pt")
    cases = [(tmp_path / "nan" / "generator_ema.pt", [], "non-finite"),
             (tmp_path / "shape" / "generator_ema.pt", [], "(out, in) = (128, 49)"),
             (tmp_path / "ok" / "generator_ema.pt", ["--alpha", "nan"], "--alpha nan"),
             (tmp_path / "ok" / "generator_ema.pt", ["--alpha", "-1"], "--alpha -1"),
             (tmp_path / "ok" / "generator_ema.pt", ["--alpha", "inf"], "--alpha inf")]
    for i, (pt, extra, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        rc, _, err = cli(capsys, "lora", "import", pt, "--backbone", "toy2d", "--out", out, *extra)
        assert rc == 2 and needle in err, (needle, err)
        assert not out.exists(), needle


def test_5_infer_step_count_has_an_upper_bound(tmp_path, capsys):
    from rtdmd.infer import main

    for argv, needle in [(["--steps", "100000000"], "--steps 100000000"), (["--samples-per-prompt", "10000000"],
                         "--samples-per-prompt"), (["--batch-size", "0"], "--batch-size 0"),
                         (["--eta", "nan"], "--eta nan")]:
        capsys.readouterr()
        rc = main(["--config", "toy2d", "--prompt", "ring", "--out", str(tmp_path / "s"), *argv])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and "expected" in err, err
    assert not (tmp_path / "s").exists()


# 6 -------------------------------------------------------------------------------------------
def test_6_flow_start_refuses_tampered_init_artifact(tmp_path):
    from rtdmd.pipeline.preflight import PreflightError, check_init_artifact

    art = trained_like_artifact(tmp_path / "art")
    w = art / "generator" / "pytorch_lora_weights.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(PreflightError, match="does not match the manifest"):
        check_init_artifact(str(art), backbone="toy2d", expected_stage="cold_start", flag="--init")


def test_6_manifest_naming_paths_outside_the_artifact_is_refused(tmp_path):
    from rtdmd.pipeline.preflight import PreflightError, check_init_artifact

    art = trained_like_artifact(tmp_path / "art")
    m = json.loads((art / "manifest.json").read_text())
    m["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PreflightError, match="unsafe path '../../etc/passwd'"):
        check_init_artifact(str(art), backbone="toy2d", expected_stage="cold_start", flag="--init")


# 7 -------------------------------------------------------------------------------------------
def test_7_corrupt_latest_checkpoint_is_quarantined_and_the_previous_one_used(tmp_path, capsys):
    out = tmp_path / "o"
    rc, err = train(capsys, out, "--max-steps", "4", overrides=[o for o in FAST if "total_steps" not in o]
                    + ["cold_start.total_steps=6"])
    assert rc == 0, err
    ck = out / "checkpoints"
    t = ck / "step-4" / "state.safetensors"
    t.write_bytes(t.read_bytes()[:-8] + b"\xff" * 8)
    rc, err = train(capsys, out, overrides=[o for o in FAST if "total_steps" not in o] + ["cold_start.total_steps=6"])
    assert rc == 0, err
    assert "warning:" in err and "step-4" in err and "quarantined" in err and f"resumed from {ck}/step-2" in err
    assert len(list(ck.glob("step-4.corrupt-*"))) == 1  # renamed, not deleted
    assert (out / "artifact" / "manifest.json").is_file()
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6]  # rows 3-4 of the abandoned branch were dropped


def test_7_file_typed_out_gives_one_line(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    rc, err = train(capsys, f)
    assert rc == 2 and "is an existing file" in err and "Traceback" not in err and f.read_text() == "x"


@pytest.mark.parametrize("errno_, text", [(28, "No space left on device"), (30, "Read-only file system")])
def test_7_full_disk_or_read_only_out_gives_one_line(tmp_path, capsys, monkeypatch, errno_, text):
    from rtdmd.train import checkpoint

    def fail(*a, **k):
        raise OSError(errno_, text, str(tmp_path / "o" / "checkpoints"))

    monkeypatch.setattr(checkpoint.CheckpointStore, "save", fail)
    rc, err = train(capsys, tmp_path / "o")
    assert rc == 2 and text in err and "Traceback" not in err and len(err.splitlines()) <= 4
    assert not (tmp_path / "o" / "artifact").exists()


def test_7_resaved_lora_file_is_byte_identical(tmp_path):
    code = ("import sys, torch\nfrom rtdmd.lora.io import save_lora_dir\n"
            "s={'m.lora_A.weight': torch.ones(2, 3), 'm.lora_B.weight': torch.zeros(4, 2)}\n"
            "save_lora_dir(sys.argv[1], s, rank=2, alpha=4.0, targets=['m'])\n")
    digests = set()
    for i in range(6):  # separate processes: the safetensors metadata order was per-process hash order
        subprocess.run([os.environ.get("PYTHON", __import__("sys").executable), "-c", code, str(tmp_path / str(i))],
                       cwd=ROOT, env=child_env(PYTHONHASHSEED="random"), check=True, timeout=120)
        digests.add(hashlib.sha256((tmp_path / str(i) / "pytorch_lora_weights.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1


# 8 -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_8_sigterm_writes_a_checkpoint_of_the_last_finished_step(tmp_path):
    out = tmp_path / "o"
    over = [o for o in FAST if "total_steps" not in o and "save_interval" not in o] + [
        "cold_start.total_steps=400", "cold_start.checkpoint.save_interval=1000"]
    proc = subprocess.Popen(train_cmd(out, *over), cwd=ROOT, env=child_env(RTDMD_PREEMPT_GRACE_S=20),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert wait_for(lambda: (out / "metrics.jsonl").is_file() and len(metric_steps(out)) >= 3, 300, proc)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        took = time.time() - t0
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert rc == 75 and took < 20, err[-2000:]
    assert "preempted: stopped by SIGTERM after step" in err and "Traceback" not in err
    ck = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file())
    logged = metric_steps(out)
    assert ck == [logged[-1]] and 3 <= ck[0] < 400  # the last finished step, nothing after it
    res = subprocess.run(train_cmd(out, *over, extra=["--max-steps", str(ck[0] + 2)]), cwd=ROOT, env=child_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints'}/step-{ck[0]}" in res.stderr
    assert metric_steps(out) == list(range(1, ck[0] + 3))  # no step repeated, none lost
