"""Child processes of the GPU check (``python -m bench.gpu_check``); each appends one JSON line per
job to ``--results`` as soon as the job ends (rank 0 only), so a timeout keeps what finished.

    python -m bench.gpu_check_worker prepare --work DIR --results R.jsonl [--dry-run]
    torchrun --standalone --nproc_per_node N -m bench.gpu_check_worker allreduce --results R.jsonl
    torchrun --standalone --nproc_per_node N -m bench.gpu_check_worker stages --jobs JOBS.json \
        --results R.jsonl --deadline EPOCH_S

``stages`` runs each job of ``JOBS.json`` (:func:`bench.gpu_check_models.stage_jobs`) in this
process, through the stage's registered trainer (``rtdmd.train.__main__.STAGES``) and its public
``run()``, with two instance-level wrappers: ``setup`` (peak CUDA memory of the load phase) and
``train_step`` (step 0 warms up, step 1 runs under :class:`torch.utils.flop_counter.FlopCounterMode`,
later steps are timed between ``torch.cuda.synchronize()`` calls). Reported per job: load and train
peaks (``torch.cuda.max_memory_allocated``), FLOPs of one step (per rank; with gradient
checkpointing they include the recomputed forwards), median step time, and the run's final metrics.
A job that fails is recorded with its one-line error and the next job runs; a job whose estimated
time no longer fits before ``--deadline`` is recorded as ``skipped: budget``.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.compute_eff import register_cpu_sdpa_formulas

# rough lower bounds (s) of one job on an H200 / in the CPU dry run, for the budget check
JOB_ESTIMATE_S = {("tiny_flux2", False): 15, ("mid", False): 60, ("tiny_flux2", True): 5, ("mid", True): 8}


def write(results: Path, row: dict) -> None:
    with open(results, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=str) + "\n")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib(reset: bool = False) -> float | None:
    if not torch.cuda.is_available():
        return None
    v = torch.cuda.max_memory_allocated() / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return v


def _error(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:500]


# --------------------------------------------------------------------------------- prepare
def prepare(a) -> int:
    """Tiny FLUX.2 pipeline, tiny reward checkpoints, the mid-size pipeline (GPU: built on CUDA)."""
    from bench.gpu_check_models import MID_DRY, MID_GPU, build_mid_pipeline
    from bench.setups import reward_ckpts
    from rtdmd.backbones.tiny import ensure_tiny

    work = Path(a.work)
    for name, fn in (("tiny_flux2", lambda: ensure_tiny("flux2", work / "tiny_flux2")),
                     ("reward_ckpts", lambda: reward_ckpts(work)),
                     ("mid", lambda: build_mid_pipeline(MID_DRY if a.dry_run else MID_GPU,
                                                        work / ("mid_dry" if a.dry_run else "mid_klein"),
                                                        work / "tiny_flux2",
                                                        "cuda" if torch.cuda.is_available() else "cpu"))):
        t = time.perf_counter()
        try:
            path = fn()
            write(Path(a.results), {"job": f"prepare/{name}", "status": "ok", "path": str(path),
                                    "seconds": time.perf_counter() - t})
        except Exception as exc:  # the report says what broke; later phases skip what needs it
            write(Path(a.results), {"job": f"prepare/{name}", "status": "failed", "error": _error(exc),
                                    "traceback": traceback.format_exc()[-3000:]})
            return 1
    return 0


# --------------------------------------------------------------------------------- all-reduce
def allreduce(a) -> int:
    """Process group on all local devices (nccl on CUDA, gloo on CPU), a checked all-reduce and the
    bus bandwidth of a 256 MiB (dry run: 1 MiB) all-reduce."""
    import torch.distributed as dist

    from rtdmd import dist as D

    row: dict[str, Any] = {"job": "allreduce"}
    try:
        env = D.init_distributed(None)
        if not dist.is_initialized():
            raise RuntimeError("not under torchrun: no process group")
        world, dev = dist.get_world_size(), env.device
        x = torch.full((1024,), float(env.rank + 1), device=dev)
        dist.all_reduce(x)
        want = world * (world + 1) / 2
        ok = bool(torch.all(x == want))
        n = (256 if dev.type == "cuda" else 1) * 2**20 // 4
        buf = torch.ones(n, device=dev)
        for _ in range(2):
            dist.all_reduce(buf)
        _sync()
        t = time.perf_counter()
        reps = 5
        for _ in range(reps):
            dist.all_reduce(buf)
        _sync()
        dt = (time.perf_counter() - t) / reps
        busbw = 2 * (world - 1) / world * n * 4 / dt / 1e9 if world > 1 else None
        row.update(status="ok" if ok else "failed", backend=dist.get_backend(), world=world, device=str(dev),
                   sum_correct=ok, seconds_per_allreduce=dt, bytes=n * 4, bus_gbps=busbw)
        if not ok:
            row["error"] = f"all-reduce sum {float(x[0])} != {want}"
    except Exception as exc:
        row.update(status="failed", error=_error(exc), traceback=traceback.format_exc()[-3000:])
    if _rank() == 0:
        write(Path(a.results), row)
    D.teardown()
    return 0 if row["status"] == "ok" else 1


# --------------------------------------------------------------------------------- stages
class Probe:
    """Instance-level wrappers around a trainer's ``setup`` and ``train_step`` (see module doc)."""

    def __init__(self, trainer):
        self.tr = trainer
        self.times: list[float] = []
        self.flops: int | None = None
        self.load_s: float | None = None
        self.load_peak: float | None = None
        self.step_peaks: list[float] = []
        self._setup, self._step = trainer.setup, trainer.train_step
        trainer.setup, trainer.train_step = self.setup, self.step

    def setup(self):
        t = time.perf_counter()
        out = self._setup()
        _sync()
        self.load_s = time.perf_counter() - t
        self.load_peak = _peak_gib(reset=True)
        return out

    def step(self):
        i = self.tr.step
        _sync()
        if i == 1:
            register_cpu_sdpa_formulas()
            with FlopCounterMode(display=False) as fc:
                out = self._step()
            self.flops = int(fc.get_total_flops())
        else:
            t = time.perf_counter()
            out = self._step()
            _sync()
            if i >= 2:
                self.times.append(time.perf_counter() - t)
        peak = _peak_gib()
        if peak is not None:
            self.step_peaks.append(peak)
        return out


def _dist_env(params, stage: str):
    """The process group and device the stage CLI uses (``rtdmd.dist.init_distributed``)."""
    from rtdmd import dist as D

    return D.init_distributed(params, stage)


def _trainer_cls(stage: str):
    import importlib

    from rtdmd.train.__main__ import STAGES

    module, cls = STAGES[stage].split(":")
    return getattr(importlib.import_module(module), cls)


def run_job(job: dict, init: str | None) -> dict:
    from rtdmd.config import load_params
    from rtdmd.train.base import RunOptions
    from rtdmd.train.logging import NullLogger

    params = load_params(job["config"], job["overrides"])
    env = _dist_env(params, job["stage"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    tr = _trainer_cls(job["stage"])(params, RunOptions(out=job["out"], init=init), env, logger=NullLogger())
    probe = Probe(tr)
    t = time.perf_counter()
    tr.run()
    wall = time.perf_counter() - t
    times = sorted(probe.times)
    med = times[len(times) // 2] if times else None
    summary = {k: v for k, v in tr.summary.items() if isinstance(v, float)}
    finite = all(math.isfinite(v) for v in summary.values())
    row = {"status": "ok" if finite else "failed", "world": env.world, "device": str(env.device),
           "backend": env.backend, "steps": tr.step, "wall_s": wall, "load_s": probe.load_s,
           "load_peak_gib": probe.load_peak, "train_peak_gib": max(probe.step_peaks) if probe.step_peaks else None,
           "flops_per_step": probe.flops, "step_times_s": probe.times, "step_median_s": med,
           "achieved_tflops": (probe.flops / med / 1e12) if (probe.flops and med) else None,
           "artifact": str(Path(job["out"]) / "artifact"), "metrics": summary}
    if not finite:
        row["error"] = "non-finite final metrics: " + ", ".join(k for k, v in summary.items() if not math.isfinite(v))
    del probe, tr
    return row


def stages(a) -> int:
    from rtdmd import dist as D

    jobs = json.loads(Path(a.jobs).read_text())
    results, deadline = Path(a.results), float(a.deadline)
    if a.reward_ckpts:
        os.environ["RTDMD_REWARD_CKPT_PATH"] = a.reward_ckpts
    done: dict[str, dict] = {}
    failures = 0
    for job in jobs:
        base = {"job": job["name"], "model": job["model"], "recipe": job["recipe"], "stage": job["stage"],
                "config": job["config"], "overrides": job["overrides"]}
        est = JOB_ESTIMATE_S[(job["model"], a.dry_run)]
        dep = done.get(job["init_from"]) if job["init_from"] else None
        if job["unavailable"]:
            row = {**base, "status": "unavailable", "reason": job["unavailable"]}
        elif time.time() + est > deadline:
            row = {**base, "status": "skipped: budget", "reason": f"needs ≈{est} s, {deadline - time.time():.0f} s left"}
        elif job["init_from"] and (dep is None or dep["status"] != "ok"):
            row = {**base, "status": "skipped", "reason": f"needs the artifact of {job['init_from']}, which did not finish"}
        else:
            try:
                row = {**base, **run_job(job, dep["artifact"] if dep else None)}
            except Exception as exc:  # recorded; the next job still runs
                row = {**base, "status": "failed", "error": _error(exc), "traceback": traceback.format_exc()[-3000:]}
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        failures += row["status"] == "failed"
        done[job["name"]] = row
        if _rank() == 0:
            write(results, row)
    D.teardown()
    return 1 if failures else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check_worker")
    ap.add_argument("what", choices=("prepare", "allreduce", "stages"))
    ap.add_argument("--results", required=True)
    ap.add_argument("--work", default=None)
    ap.add_argument("--jobs", default=None)
    ap.add_argument("--deadline", default=str(time.time() + 3600))
    ap.add_argument("--reward-ckpts", default=None)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    return {"prepare": prepare, "allreduce": allreduce, "stages": stages}[a.what](a)


if __name__ == "__main__":
    sys.exit(main())
