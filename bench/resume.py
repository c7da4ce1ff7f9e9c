"""Item 6 — resume waste: SIGKILL or SIGTERM a toy2d cold-start run after a checkpoint, resume,
count the repeated work (SIGKILL: ≤ one checkpoint interval; SIGTERM: none, the run checkpoints
the last finished step before exiting with status 75).

``python -m rtdmd.train cold_start --config toy2d --out DIR`` (a plain child process, logging
every step to ``DIR/metrics.jsonl``, checkpoint every ``I`` steps). The driver waits until the
checkpoint ``step-k`` is complete and the run has logged step ``k + I/2``, sends the signal to the
child (its own process only), and re-runs the same command. From the logs (the re-run drops rows
logged after its resume point, so ``metrics.jsonl`` never holds two rows for one step):

* repeated steps = last step logged before the kill − the step the resumed run starts from
  (+ the step in flight when killed, which is lost too: counted as one more);
* repeated seconds = repeated steps × median step time; restart overhead = launch of the
  resumed process → its first new step (imports, model build, checkpoint load);
* exactness: the losses the resumed run logs for the repeated steps vs the first run's (same
  values ⇒ the checkpoint restored optimizer, EMA, data position and RNG).

Target: repeated work ≤ one checkpoint interval (steps and seconds).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_INTERVALS = 1.0


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by the kill
    return rows


def _cmd(out: Path, total: int, interval: int) -> list[str]:
    return [sys.executable, "-m", "rtdmd.train", "cold_start", "--config", "toy2d", "--out", str(out),
            f"cold_start.total_steps={total}", f"cold_start.checkpoint.save_interval={interval}",
            "cold_start.checkpoint.keep_last=2", "cold_start.log_interval=1", "cold_start.eval_interval=0",
            "distributed.strategy=none"]


def _latest_complete(out: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")
             if p.name.split("-")[1].isdigit() and (p / "COMPLETE").is_file()]
    return max(steps, default=0)


def _interrupt(proc, metrics: Path, ckpt: Path, interval: int, kill_after: int, sig, deadline: float):
    """Wait for the kill point, send ``sig``; returns (last step logged at the signal, seconds to exit)."""
    while time.time() < deadline:
        rows = _read(metrics)
        last = rows[-1]["step"] if rows else 0
        if ckpt.is_file() and last >= interval + kill_after:
            t0 = time.time()
            proc.send_signal(sig)
            proc.wait()
            return last, time.time() - t0
        if proc.poll() is not None:
            raise RuntimeError(f"run finished before the kill point: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    raise TimeoutError("kill point not reached")


def one(workdir: Path, total: int, interval: int, kill_after: int, sig=signal.SIGKILL, timeout: float = 300) -> dict:
    from bench.common import child_env, med

    out = Path(tempfile.mkdtemp(prefix="bench-resume-", dir=workdir))
    env = child_env(threads=1, RTDMD_DETERMINISTIC="1")
    metrics = out / "metrics.jsonl"
    ckpt = out / "checkpoints" / f"step-{interval}" / "COMPLETE"
    cwd = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen(_cmd(out, total, interval), env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        killed_at, exit_s = _interrupt(proc, metrics, ckpt, interval, kill_after, sig, time.time() + timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    status = proc.returncode
    first = _read(metrics)
    last_logged = max(r["step"] for r in first)
    before = {r["step"]: r for r in first}
    resumed_from = _latest_complete(out)
    t_launch = time.time()
    proc = subprocess.Popen(_cmd(out, total, interval), env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    t_first = None
    while proc.poll() is None and time.time() < t_launch + 2 * timeout:
        if t_first is None and any(r["step"] == resumed_from + 1 and r != before.get(r["step"]) for r in _read(metrics)):
            t_first = time.time()  # the resumed run logged its first step
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.wait() != 0:
        raise RuntimeError(f"resumed run failed: {err[-2000:]}")
    rows = _read(metrics)
    second = [r for r in rows if r["step"] > resumed_from]
    el = [(r["step"], r["time/elapsed_s"]) for r in second]
    step_s = med([b[1] - a[1] for a, b in zip(el, el[1:])])
    # launch -> first new step logged, minus that step's own time: imports, model build, checkpoint load
    startup = (t_first or time.time()) - t_launch - step_s
    # SIGKILL also loses the step in flight; SIGTERM finishes it and checkpoints it
    repeated = last_logged - resumed_from + (1 if sig == signal.SIGKILL else 0)
    same = []
    for r in second:
        if r["step"] in before and r["step"] <= last_logged:
            a, b = before[r["step"]], r
            keys = [k for k in a if k.startswith(("fake/", "generator/")) and k in b and not k.endswith("lr")]
            same.append(all(abs(float(a[k]) - float(b[k])) <= 1e-6 * max(1.0, abs(float(a[k]))) for k in keys))
    ok_final = (out / "artifact" / "manifest.json").is_file()
    return {"signal": signal.Signals(sig).name, "exit_status": status, "exit_s": exit_s, "interval": interval,
            "checkpoint_step": resumed_from, "killed_after_logged_step": killed_at,
            "last_logged_before_kill": last_logged, "repeated_steps": repeated,
            "repeated_intervals": repeated / interval, "step_s": step_s, "repeated_s": repeated * step_s,
            "interval_s": interval * step_s, "restart_overhead_s": startup,
            "duplicate_metric_rows": len(rows) - len({r["step"] for r in rows}),
            "repeated_steps_reproduce_losses": (not same) or all(same), "compared_steps": len(same),
            "finished_with_artifact": ok_final}


def run(quick: bool, workdir: Path) -> dict:
    from bench.common import stats

    interval = 50 if quick else 100
    repeats = 1 if quick else 3
    total = 2 * interval + interval // 2 + 10
    rows = [one(workdir, total, interval, interval // 2, sig) for sig in (signal.SIGKILL, signal.SIGTERM)
            for _ in range(repeats)]
    kill = [r for r in rows if r["signal"] == "SIGKILL"]
    term = [r for r in rows if r["signal"] == "SIGTERM"]
    rep = stats([r["repeated_intervals"] for r in kill])
    worst = max(r["repeated_intervals"] for r in kill)
    table = [{"repeat": i + 1, "signal": r["signal"], "exit status": r["exit_status"], "exit s": r["exit_s"],
              "interval (steps)": r["interval"], "resumed from step": r["checkpoint_step"],
              "last step before kill": r["last_logged_before_kill"], "repeated steps": r["repeated_steps"],
              "repeated s": r["repeated_s"], "interval s": r["interval_s"], "restart overhead s": r["restart_overhead_s"],
              "repeated / interval": r["repeated_intervals"], "duplicate rows": r["duplicate_metric_rows"],
              "losses reproduced": r["repeated_steps_reproduce_losses"], "finished": r["finished_with_artifact"]}
             for i, r in enumerate(rows)]
    return {"title": "Resume waste", "metric": "repeated steps ÷ checkpoint interval (worst SIGKILL repeat)",
            "value": worst, "median": rep["median"], "min": rep["min"], "target": "≤ 1 interval (SIGKILL), 0 (SIGTERM)",
            "met": (worst <= TARGET_INTERVALS and all(r["repeated_steps"] == 0 and r["exit_status"] == 75 for r in term)
                    and all(r["finished_with_artifact"] and r["duplicate_metric_rows"] == 0 for r in rows)),
            "threads": 1, "repeats": repeats, "table": table, "details": rows,
            "notes": ["toy2d cold start, signal half an interval after a complete checkpoint, same command re-run; "
                      "SIGKILL: the step in flight at the kill is counted as repeated; SIGTERM: the run finishes "
                      "that step, checkpoints it and exits 75, so nothing is repeated",
                      "restart overhead (process start, imports, model build, checkpoint load) is reported "
                      "separately from repeated training work"]}


def main(argv=None) -> int:
    from bench.common import item_main

    return item_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
