"""GPU check: one command that proves the GPU path and measures MFU the moment a GPU is at hand.

    python -m bench.gpu_check --out DIR [--budget-s 480] [--require-gpu] [--dry-run] [--force]

Phases (each checks the remaining budget first and is recorded as ``skipped: budget`` rather than
overrunning; ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` are rewritten after every phase, so
a run cut short still leaves what finished):

1. ``env`` — GPU name, memory, compute capability, driver, CUDA and torch versions, the versions of
   the libraries the trainer imports, whether the torch APIs the project calls exist (FSDP2
   ``fully_shard`` / ``MixedPrecisionPolicy``, DDP's ``forward_sync_buffers``), and a bf16
   ``8192³`` matmul peak measured in this run (median of 10 CUDA-event timings after 3 warm-ups on
   random data): the MFU denominator.
2. ``nccl`` — torchrun on all local GPUs, NCCL process group, a checked all-reduce (+ bus bandwidth).
3. ``prepare`` — the ``tiny_flux2`` pipeline, tiny reward checkpoints and the mid-size pipeline
   (real FLUX.2-klein 4B blocks, reduced depth; :mod:`bench.gpu_check_models`).
4. ``launch`` — the stage commands under torchrun exactly as users run them
   (``-m rtdmd.train cold_start`` then ``rl --init <cold-start artifact>``, tiny_flux2 params).
5. ``stages`` — both stages, a few steps, on tiny_flux2 and on the mid-size model, FSDP2 with bf16
   mixed precision, with fp32 and with bf16 LoRA masters (:mod:`bench.gpu_check_worker`): peak CUDA
   memory of load and training, FLOPs of one step, median step time.
6. ``plan`` — peak memory measured ÷ the real-scale planner's prediction for the same configuration
   (:mod:`bench.gpu_check_plan`; "planner not available" when this checkout has none); MFU per
   stage = FLOPs per step ÷ median step time ÷ the peak of phase 1.

``--dry-run`` runs every phase on CPU with tiny sizes (gloo instead of NCCL, 2 ranks for the
all-reduce, fp32 where bf16 mixed precision falls back on CPU, a CPU fp32 matmul as the "peak").
Without CUDA and without ``--dry-run`` the command prints one line and exits 0 (1 with
``--require-gpu``). Exit status: 0 when every phase that ran passed, 1 when something failed (the
report says what), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT
from bench.gpu_check_report import render_md, summarise

SKIP_LINE = "no CUDA device: GPU checks skipped"
# seconds a phase needs at least (GPU, dry run); below that it is skipped for the budget
PHASE_MIN_S = {"nccl": (25, 10), "prepare": (60, 15), "launch": (60, 20), "stages": (60, 20), "plan": (5, 2)}
RESERVE_S = 8  # kept back for writing the report


def error_line(log: str) -> str:
    """The most telling line of a failed child's log: its last ``...Error: ...``/``error: ...`` line
    that is not torchrun's own wrapper, else its last line."""
    lines = [ln.strip() for ln in log.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"(Error|Exception|error):", ln) and "ChildFailedError" not in ln \
                and not ln.startswith(("torch.distributed.elastic", "raise ")):
            return ln[:400]
    return lines[-1][:400] if lines else "(no output)"


class Check:
    def __init__(self, out: Path, work: Path, budget_s: float, dry: bool, bf16_key: str | None, steps: int):
        self.out, self.work, self.dry, self.bf16_key, self.steps = out, work, dry, bf16_key, steps
        self.t0 = time.time()
        self.deadline = self.t0 + budget_s
        self.results = out / "results.jsonl"
        self.logs = out / "logs"
        self.report: dict[str, Any] = {
            "title": "GPU check", "mode": "dry-run (CPU)" if dry else "gpu", "budget_s": budget_s,
            "started_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "host": platform.node(), "command": " ".join(["python -m bench.gpu_check", *sys.argv[1:]]),
            "phases": {}, "env": {}, "nccl": None, "prepare": [], "launch": [], "stages": []}

    # ---- bookkeeping -----------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.time()

    def fits(self, phase: str) -> bool:
        need = PHASE_MIN_S[phase][1 if self.dry else 0]
        if self.left() - RESERVE_S < need:
            self.report["phases"][phase] = {"status": "skipped: budget",
                                            "reason": f"needs ≥{need} s, {max(0.0, self.left()):.0f} s left"}
            self.save()
            return False
        return True

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.time() - self.t0, 1)
        summarise(self.report)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=2, default=str))
        os.replace(tmp, self.out / "gpu_check.json")
        (self.out / "gpu_check.md").write_text(render_md(self.report))

    def rows(self, prefix: str) -> list[dict]:
        if not self.results.is_file():
            return []
        out = []
        for line in self.results.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("job", "").startswith(prefix):
                out.append(row)
        return out

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        path = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        threads = "1" if self.dry else "8"
        env.update({"PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                    "RTDMD_REWARD_CKPT_PATH": str(self.work / "reward_ckpts")})
        env.pop("MLFLOW_TRACKING_URI", None)  # the check logs nowhere but its own report
        return env

    def call(self, phase: str, name: str, cmd: list[str]) -> dict:
        """Run one child with the remaining budget as its timeout; its output is appended to
        ``logs/PHASE.log`` (one log per phase keeps the report folder at 7 files)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{phase}.log"
        timeout = max(1.0, self.left() - RESERVE_S)
        t = time.perf_counter()
        with open(log, "a") as f:
            f.write(f"=== {name}: {' '.join(cmd)}\n")
            f.flush()
            start = f.tell()
            # own session: on timeout the whole tree (torchrun and its ranks) is killed, so no rank
            # keeps GPU memory while the next phase runs
            proc = subprocess.Popen(cmd, cwd=str(ROOT), env=self.child_env(), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
        res = {"name": name, "rc": rc, "seconds": round(time.perf_counter() - t, 1), "log": str(log.relative_to(self.out)),
               "status": "ok" if rc == 0 else ("timeout (budget)" if rc is None else "failed")}
        if rc not in (0, None):
            with open(log, errors="replace") as f:
                f.seek(start)
                res["error"] = error_line(f.read())
        return res

    def torchrun(self, nproc: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]

    # ---- phases ------------------------------------------------------------------------------
    def env_phase(self) -> None:
        from bench.gpu_check_env import environment

        t = time.perf_counter()
        try:
            self.report["env"] = environment(self.dry)
            status = "ok" if self.report["env"].get("peak_tflops") else "failed"
        except Exception as exc:
            self.report["env"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            status = "failed"
        self.report["phases"]["env"] = {"status": status, "seconds": round(time.perf_counter() - t, 1)}
        self.save()

    def world(self) -> int:
        return int(self.report["env"].get("gpu_count") or 1) if not self.dry else 1

    def nccl_phase(self) -> None:
        if not self.fits("nccl"):
            return
        n = 2 if self.dry else self.world()
        res = self.call("nccl", "nccl", [*self.torchrun(n), "-m", "bench.gpu_check_worker", "allreduce",
                                         "--results", str(self.results)])
        rows = self.rows("allreduce")
        self.report["nccl"] = rows[-1] if rows else None
        self.report["phases"]["nccl"] = res
        self.save()

    def prepare_phase(self) -> bool:
        if not self.fits("prepare"):
            return False
        res = self.call("prepare", "prepare", [sys.executable, "-m", "bench.gpu_check_worker", "prepare", "--work",
                                               str(self.work), "--results", str(self.results)]
                        + (["--dry-run"] if self.dry else []))
        self.report["prepare"] = self.rows("prepare/")
        self.report["phases"]["prepare"] = res
        self.save()
        return res["status"] == "ok"

    def launch_phase(self) -> None:
        from bench.gpu_check_models import launch_commands

        if not self.fits("launch"):
            return
        results: list[dict] = []
        status: dict[str, str] = {}
        for name, cmd, needs in launch_commands(self.work, world=self.world(), torchrun=self.torchrun(self.world())):
            if needs and status.get(needs) != "ok":
                res = {"name": name, "status": "skipped", "reason": f"needs {needs}, which did not pass"}
            elif self.left() - RESERVE_S < PHASE_MIN_S["launch"][1 if self.dry else 0] / 2:
                res = {"name": name, "status": "skipped: budget"}
            else:
                res = self.call("launch", name, cmd)
                res["command"] = " ".join(cmd[cmd.index("-m", 2):])
            status[name] = res["status"]
            results.append(res)
        self.report["launch"] = results
        self.report["phases"]["launch"] = {"status": "ok" if all(r["status"] == "ok" for r in results) else
                                           ("failed" if "failed" in status.values() else "incomplete")}
        self.save()

    def stages_phase(self) -> None:
        from bench.gpu_check_models import stage_jobs

        if not self.fits("stages"):
            return
        jobs = stage_jobs(self.work, dry=self.dry, world=self.world(), steps=self.steps, bf16_key=self.bf16_key)
        jf = self.work / "jobs.json"
        jf.write_text(json.dumps(jobs, indent=1))
        res = self.call("stages", "stages", [
            *self.torchrun(self.world()), "-m", "bench.gpu_check_worker", "stages", "--jobs", str(jf),
            "--results", str(self.results), "--deadline", str(self.deadline - RESERVE_S - 5),
            "--reward-ckpts", str(self.work / "reward_ckpts"), *(["--dry-run"] if self.dry else [])])
        seen = {r["job"]: r for r in self.rows("tiny_flux2/") + self.rows("mid/")}
        self.report["stages"] = [seen.get(j["name"], {"job": j["name"], "model": j["model"], "recipe": j["recipe"],
                                                      "stage": j["stage"], "status": "not reached",
                                                      "reason": "the stages process ended before this job"})
                                 for j in jobs]
        self.report["phases"]["stages"] = res
        self.save()

    def plan_phase(self) -> None:
        from bench.gpu_check_plan import planned_peak

        if not self.fits("plan"):
            return
        for row in self.report["stages"]:
            if row.get("status") != "ok":
                continue
            row["plan"] = planned_peak(row["config"], row["overrides"], row["stage"], int(row.get("world") or 1),
                                       env=self.child_env(), timeout=max(5.0, min(120.0, self.left() - RESERVE_S)))
        statuses = {r["plan"]["status"] for r in self.report["stages"] if "plan" in r}
        self.report["phases"]["plan"] = {"status": "ok" if statuses <= {"ok"} else ", ".join(sorted(statuses))}
        self.save()

    def run(self) -> int:
        self.env_phase()
        self.nccl_phase()
        if self.prepare_phase():
            self.launch_phase()
            self.stages_phase()
            self.plan_phase()
        self.report["finished_utc"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        self.save()
        return 1 if self.report["failures"] else 0


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="report directory (gpu_check.json, gpu_check.md, logs/, work/)")
    ap.add_argument("--work", default=None,
                    help="models and runs (default OUT/work; reused as a cache: several GB on the GPU)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole check (default 480)")
    ap.add_argument("--require-gpu", action="store_true", help="exit 1 when no CUDA device is present")
    ap.add_argument("--dry-run", action="store_true", help="every phase on CPU with tiny sizes (CI)")
    ap.add_argument("--steps", type=int, default=None, help="steps per stage job (default 5 on GPU, 3 dry; ≥ 3)")
    ap.add_argument("--bf16-masters", default=None, metavar="KEY=VALUE",
                    help="params override that selects bf16 LoRA master weights (default: found in the schema)")
    ap.add_argument("--force", action="store_true", help="replace an existing report in --out")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    if not a.dry_run and not cuda_available():
        print(SKIP_LINE)
        return 1 if a.require_gpu else 0
    out = Path(a.out)
    steps = a.steps if a.steps is not None else (3 if a.dry_run else 5)
    if steps < 3:
        print(f"error: --steps {steps}: need at least 3 (warm-up, FLOP count, one timed step)", file=sys.stderr)
        return 2
    if a.budget_s <= 0:
        print(f"error: --budget-s {a.budget_s}: must be positive", file=sys.stderr)
        return 2
    if a.bf16_masters is not None and "=" not in a.bf16_masters:
        print(f"error: --bf16-masters {a.bf16_masters!r}: expected a params override KEY=VALUE", file=sys.stderr)
        return 2
    if (out / "gpu_check.json").exists() and not a.force:
        print(f"error: --out {out}: already holds gpu_check.json; pass --force to replace it", file=sys.stderr)
        return 2
    if out.exists() and a.force:
        for name in ("results.jsonl", "gpu_check.json", "gpu_check.md"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "logs", ignore_errors=True)
    work = Path(a.work) if a.work else out / "work"
    if (work / "jobs.json").is_file():  # a work dir of an earlier check: drop its training outputs
        for stale in ("runs", "launch"):  # (a stage re-run on the same --out would resume); models stay cached
            shutil.rmtree(work / stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    check = Check(out, work, a.budget_s, a.dry_run, a.bf16_masters, steps)
    rc = check.run()
    print(f"gpu check ({check.report['mode']}): {check.report['verdict']} — report {out / 'gpu_check.md'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
