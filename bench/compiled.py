"""Item 8 — compiled vs eager: one training step with ``distributed.compile`` (regional
``torch.compile`` of the repeated transformer blocks, :mod:`rtdmd.train.compiling`) ÷ the same
step eager, per stage, on the compute-bound sized tiny_flux2 (:data:`bench.compute_eff.LARGE`).

Two trainers with the same params and seeds, one with ``distributed.compile.enabled=always``.
The compiled one is warmed up first (the warm-up — every (shape, grad mode) the stage uses —
is timed and reported as the compile cost), then steps alternate eager / compiled round by
round, so machine load hits both. ``ratio = median(compiled) / median(eager)``; target ≤ 0.8.
Recompilations after warm-up are counted (dynamo's unique-graph counter) and must be 0.
Where the time goes: ``torch.profiler`` self-CPU top operators of one compiled and one eager
step, and the eager step's share in matmul/attention kernels (:data:`EXTERN`) — on CPU inductor
fuses the elementwise work around them but calls those same kernels, so that share bounds the
ratio from below.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

TARGET = 0.8
# kernels inductor does not generate on CPU: it calls these same ATen kernels from compiled code
EXTERN = ("aten::mm", "aten::bmm", "aten::addmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
          "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def _profile(step, top: int = 8) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1
    extern = sum(e.self_cpu_time_total for e in rows if e.key in EXTERN) / total
    return [{"op": e.key[:60], "self ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "extern_share": extern} for e in rows[:top]]


def run_stage(stage: str, overrides: list[str], rounds: int, workdir: Path) -> dict:
    from bench import setups
    from bench.common import stats, timed
    from rtdmd.train.compiling import compiles_so_far

    def make(enabled: str):
        out = Path(tempfile.mkdtemp(prefix=f"bench-comp-{enabled}-", dir=workdir))
        ov = [*overrides, f"distributed.compile.enabled={enabled}"]
        if stage == "cold_start":
            return setups.cold_start_trainer("tiny_flux2", out, ov)
        return setups.rl_trainer("tiny_flux2", out, workdir, ov)

    eager, comp = make("never"), make("always")
    t0 = time.perf_counter()
    for _ in range(2):  # every shape / grad mode of the stage, twice (a second pass must not compile)
        setups.loop_step(comp)
    warm_s = time.perf_counter() - t0
    setups.loop_step(eager)
    warm_graphs = compiles_so_far()
    te, tc, per_round = [], [], []
    for _ in range(rounds):
        e = timed(lambda: setups.loop_step(eager))
        c = timed(lambda: setups.loop_step(comp))
        te.append(e)
        tc.append(c)
        per_round.append(c / e)
    recompiles = compiles_so_far() - warm_graphs
    se, sc = stats(te), stats(tc)
    return {"stage": stage, "eager median s": se["median"], "compiled median s": sc["median"],
            "ratio": sc["median"] / se["median"], "ratio per round (median)": stats(per_round)["median"],
            "warm-up s": warm_s, "graphs compiled": warm_graphs, "recompiles after warm-up": recompiles,
            "rounds": rounds, "profile_compiled": _profile(lambda: setups.loop_step(comp)),
            "profile_eager": _profile(lambda: setups.loop_step(eager))}


def run(quick: bool, workdir: Path, threads: int = 1) -> dict:
    from bench.common import set_threads
    from bench.compute_eff import LARGE, large_overrides

    set_threads(threads)
    ov = large_overrides(workdir)
    rounds = 2 if quick else 5
    details = [run_stage("cold_start", ov, rounds, workdir),
               run_stage("rl", ov + LARGE["rl_overrides"], rounds, workdir)]
    table = [{k: v for k, v in d.items() if not k.startswith("profile")} for d in details]
    worst = max(d["ratio"] for d in details)
    ratios = ", ".join(f"{d['stage']} {d['ratio']:.2f}" for d in details)
    bound = ", ".join(f"{d['stage']} {d['profile_eager'][0]['extern_share']:.2f}" for d in details)
    prof = "; ".join(f"{d['stage']} compiled: " + ", ".join(f"{p['op']} {100 * p['share']:.0f}%"
                                                             for p in d["profile_compiled"][:4]) for d in details)
    return {"title": "Compiled vs eager", "metric": f"max ratio median(compiled)/median(eager), both stages, "
                                                      f"tiny_flux2 {LARGE['label']}",
            "value": worst, "target": f"≤ {TARGET} for both stages", "met": worst <= TARGET, "threads": threads,
            "repeats": rounds, "table": table, "details": details,
            "finding": f"compiled ÷ eager {ratios}; "
                       f"recompiles after warm-up {sum(d['recompiles after warm-up'] for d in details)}; "
                       f"top self-CPU ops: {prof}. Share of the eager step in matmul/attention kernels (which "
                       f"compiled code calls unchanged on CPU, so compiled ÷ eager cannot go below it): {bound}",
            "notes": ["compiled = distributed.compile.enabled=always (inductor, dynamic=false); eager = never; "
                      "same params and seeds, steps alternate round by round",
                      "warm-up s = two compiled steps from a cold dynamo cache in this process (inductor's on-disk "
                      "kernel cache may already hold kernels from an earlier run)",
                      "profiles (self CPU, one step each): in results.json, details"]}


def main(argv=None) -> int:
    from bench.common import item_main

    return item_main(run, argv, threads=True)


if __name__ == "__main__":
    sys.exit(main())
