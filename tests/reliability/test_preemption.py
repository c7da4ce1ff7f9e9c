"""Preemption: SIGTERM/SIGINT stop every rank after the same step, checkpoint it, exit 75, lose nothing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from .helpers import FAST, ROOT, child_env, metric_steps, train, train_cmd, wait_for

LONG = [o for o in FAST if "total_steps" not in o and "save_interval" not in o] + [
    "cold_start.total_steps=400", "cold_start.checkpoint.save_interval=1000"]


def _complete_steps(out):
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file())


@pytest.mark.slow
def test_sigterm_under_two_process_torchrun_checkpoints_last_step_and_rerun_repeats_none(tmp_path):
    out = tmp_path / "o"
    over = [o for o in LONG if o != "distributed.strategy=none"] + ["distributed.strategy=ddp"]
    proc = subprocess.Popen(train_cmd(out, *over, nproc=2, extra=["--preempt-grace-s", "20"]), cwd=ROOT,
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert wait_for(lambda: (out / "metrics.jsonl").is_file() and len(metric_steps(out)) >= 3, 600, proc), \
            proc.stderr.read()[-3000:] if proc.poll() is not None else "no progress"
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)  # what Kubernetes sends to the pod's torchrun
        proc.wait(60)
        took = time.time() - t0
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    err = proc.stderr.read()
    assert took < 30, err[-3000:]  # within Kubernetes' default grace period
    assert "preempted: stopped by SIGTERM after step" in err, err[-3000:]
    ck, logged = _complete_steps(out), metric_steps(out)
    assert ck == [logged[-1]] and ck[0] >= 3, (ck, logged)  # the last finished step, on every rank
    step = ck[0]
    res = subprocess.run(train_cmd(out, *over, nproc=2, extra=["--max-steps", str(step + 2)]), cwd=ROOT,
                         env=child_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints'}/step-{step}" in res.stderr
    assert metric_steps(out) == list(range(1, step + 3))


def test_sigint_in_process_stops_after_a_finished_step_with_status_75(tmp_path, capsys):
    out = tmp_path / "o"

    def interrupt():
        if wait_for(lambda: (out / "metrics.jsonl").is_file() and len(metric_steps(out)) >= 2, 300):
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    t = threading.Thread(target=interrupt, daemon=True)
    t.start()
    rc, err = train(capsys, out, overrides=LONG)
    t.join(5)
    assert rc == 75, err[-2000:]
    assert "preempted: stopped by SIGINT after step" in err
    ck = _complete_steps(out)
    assert ck == [metric_steps(out)[-1]]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    # re-run to a later step: resumes there, no duplicate rows
    rc, err = train(capsys, out, "--max-steps", str(ck[0] + 1), overrides=LONG)
    assert rc == 0 and f"step-{ck[0]}" in err
    assert metric_steps(out) == list(range(1, ck[0] + 2))


_GUARD = """
import os, signal, sys, time
from rtdmd.train.preemption import PreemptionGuard
with PreemptionGuard(float(sys.argv[1])) as g:
    print("ready", flush=True)
    if sys.argv[2] == "twice":
        os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2); os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)  # a step or save that never finishes
"""


@pytest.mark.parametrize("mode, status, most_s", [("hang", 76, 15), ("twice", 128 + 15, 10)])
def test_stop_is_bounded_by_the_grace_period_and_a_second_signal(mode, status, most_s):
    proc = subprocess.Popen([sys.executable, "-c", _GUARD, "2", mode], cwd=ROOT, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        t0 = time.time()
        if mode == "hang":
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    finally:
        proc.kill()
    assert rc == status and time.time() - t0 < most_s
    if mode == "hang":
        assert "still running 2s after SIGTERM" in proc.stderr.read()


@pytest.mark.parametrize("grace", ["0", "-1", "nan", "1e9"])
def test_grace_period_must_be_sane(tmp_path, capsys, grace):
    rc, err = train(capsys, tmp_path / "o", "--preempt-grace-s", grace)
    assert rc == 2 and "--preempt-grace-s" in err
    assert not (tmp_path / "o" / "checkpoints").exists()
