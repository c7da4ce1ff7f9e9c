"""Item 3 — scaling: step time and peak RSS vs resolution, depth, batch and number of processes.

Every point is a fresh child process (``python -m bench.scaling --worker ...``, under
``torchrun --nproc_per_node N`` for the process axis) with ``MALLOC_MMAP_THRESHOLD_=65536`` and
one thread per process, so the peak RSS (``VmHWM``) of each point is its own and no FLOP
counter runs there. Model: ``tiny_flux2`` with a width-128 transformer (4 heads × 32) built by
the tiny builder's ``transformer_overrides``; step = one cold-start iteration with a critic and a
generator turn (``fake_update_ratio=1``, random stop off), the trainer's ``train_step()`` +
``after_step()``. The base point is 64 px, 1 double + 1 single block, global batch 2, 1 process;
each axis varies one value. The exponent ``a`` of ``time ∝ x^a`` (and of RSS above the idle
baseline of an import-only process) is the least-squares slope in log-log.

Expectations: time ∝ tokens (res²) for the linear layers and tokens² (res⁴) for attention,
∝ depth and ∝ batch once compute-bound; under-1 exponents mean fixed per-step overhead.
Processes: strong scaling at fixed global batch 4 (gloo DDP); the machine has
``nproc`` cores shared with other jobs, so the 2-process point is optimistic only on a quiet
machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

BASE = {"res": 64, "double": 1, "single": 1, "batch": 2, "nproc": 1}
WIDTH = {"heads": 4, "head_dim": 32}


def axes(quick: bool) -> dict[str, list]:
    if quick:
        return {"resolution": [32, 64], "batch": [1, 2]}
    return {"resolution": [32, 64, 128], "depth": [1, 2, 4], "batch": [1, 2, 4], "processes": [1, 2]}


# ------------------------------------------------------------------------------------- worker
def worker(a) -> dict:
    import torch

    torch.set_num_threads(1)
    from bench.common import peak_rss_mb, sized_tiny_flux2, stats, timed
    from rtdmd import dist as D
    from rtdmd.train.base import RunOptions
    from rtdmd.train.cold_start import ColdStartTrainer
    from rtdmd.train.logging import NullLogger
    from bench.setups import CS_OVERRIDES, loop_step
    from rtdmd.config import load_params

    wd = Path(a.workdir)
    import diffusers  # noqa: F401 - the baseline includes the libraries the model needs
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel  # noqa: F401
    from transformers import Qwen3Model  # noqa: F401

    rss_import = peak_rss_mb()
    model = sized_tiny_flux2(wd, double=a.double, single=a.single, **WIDTH)
    strategy = "ddp" if "WORLD_SIZE" in os.environ else "none"
    params = load_params("tiny_flux2", [f"distributed.strategy={strategy}", *CS_OVERRIDES,
                                        f"model.pretrained={model}", f"model.resolution={a.res}",
                                        f"cold_start.global_batch_size={a.batch}", "cold_start.fake_update_ratio=1"])
    env = D.init_distributed(params, "cold_start")
    out = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=wd))
    tr = ColdStartTrainer(params, RunOptions(out=str(out)), env, logger=NullLogger())
    tr.setup()

    def step():
        loop_step(tr)

    step()  # warm-up
    times = [timed(step) for _ in range(a.steps)]
    res = {"rank": env.rank, "world": env.world, "rss_mb": peak_rss_mb(), "rss_import_mb": rss_import, **stats(times)}
    gathered = D.all_gather_object(res)
    D.teardown()
    if env.rank != 0:
        return {}
    return {"step_median_s": max(g["median"] for g in gathered), "step_min_s": max(g["min"] for g in gathered),
            "peak_rss_mb_per_proc": max(g["rss_mb"] for g in gathered),
            "peak_rss_mb_total": sum(g["rss_mb"] for g in gathered),
            "rss_after_imports_mb": max(g["rss_import_mb"] for g in gathered), "world": env.world}


# ------------------------------------------------------------------------------------- driver
def point(workdir: Path, steps: int, res: int, double: int, single: int, batch: int, nproc: int) -> dict:
    from bench.common import VENV_BIN, child_env, run_json
    from rtdmd.testing.s3server import free_port

    args = ["--worker", "--workdir", str(workdir), "--res", str(res), "--double", str(double), "--single",
            str(single), "--batch", str(batch), "--steps", str(steps)]
    if nproc > 1 or nproc == -1:
        n = abs(nproc)
        cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "bench.scaling", *args]
    else:
        cmd = [sys.executable, "-m", "bench.scaling", *args]
    return run_json(cmd, env=child_env(threads=1, rss=True), timeout=900)


def run(quick: bool, workdir: Path) -> dict:
    from bench.common import fit_exponent, sized_tiny_flux2

    steps = 2 if quick else 3
    rows, fits = [], {}
    cache: dict[tuple, dict] = {}
    # build the models in this process first (children then only load them)
    for d in sorted({1, *(axes(quick).get("depth", []))}):
        sized_tiny_flux2(workdir, double=d, single=d, **WIDTH)
    for axis, values in axes(quick).items():
        xs, ts, rs = [], [], []
        for v in values:
            cfg = dict(BASE)
            if axis == "resolution":
                cfg["res"] = v
            elif axis == "depth":
                cfg["double"] = cfg["single"] = v
            elif axis == "batch":
                cfg["batch"] = v
            else:
                cfg["nproc"] = -1 if v == 1 else v  # both points under torchrun (same launcher)
                cfg["batch"] = 4
            key = tuple(sorted(cfg.items()))
            if key not in cache:
                cache[key] = point(workdir, steps, cfg["res"], cfg["double"], cfg["single"], cfg["batch"],
                                   cfg["nproc"])
            r = cache[key]
            x = {"resolution": v, "depth": 2 * v, "batch": v, "processes": v}[axis]
            xs.append(x)
            ts.append(r["step_median_s"])
            rs.append(r["peak_rss_mb_per_proc"] - r["rss_after_imports_mb"])
            rows.append({"axis": axis, "value": x if axis != "depth" else f"{v}+{v} blocks",
                         "res px": cfg["res"], "blocks": 2 * cfg["double"], "global batch": cfg["batch"],
                         "procs": abs(cfg["nproc"]), "step median s": r["step_median_s"],
                         "step min s": r["step_min_s"], "peak RSS MiB/proc": r["peak_rss_mb_per_proc"],
                         "RSS above imports MiB": r["peak_rss_mb_per_proc"] - r["rss_after_imports_mb"]})
        fits[axis] = {"time_exponent": fit_exponent(xs, ts), "rss_exponent": fit_exponent(xs, rs)}
    for r in rows:
        f = fits[r["axis"]]
        r["fit: time ∝ x^a"] = f["time_exponent"]
        r["fit: RSS ∝ x^a"] = f["rss_exponent"]
    return {"title": "Scaling", "metric": "fitted exponents (time, RSS above imports) per axis",
            "value": {k: v["time_exponent"] for k, v in fits.items()}, "target": "table (no target)", "met": None,
            "threads": 1, "repeats": steps, "table": rows, "fits": fits,
            "notes": ["x = resolution (px), total blocks, global batch, processes; tokens = (res/4)² + 16 text",
                      "each point: fresh process, MALLOC_MMAP_THRESHOLD_=65536, 1 thread/process, "
                      "median of the steps after one warm-up",
                      "processes: strong scaling, global batch 4, torchrun gloo DDP, both points via torchrun"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args(argv)
    if a.worker:
        out = worker(a)
        if out:
            print(json.dumps(out))
        return 0
    wd = Path(a.workdir or tempfile.mkdtemp(prefix="bench-"))
    print(json.dumps(run(a.quick, wd), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
