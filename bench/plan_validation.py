"""Item 8 — trust the planner: simulated vs measured peak memory of the same training step on CPU.

For each validation case (``rtdmd.plan.validate.CASES``: "tiny" and a "sized" FLUX.2-klein
cold-start iteration with its generator turn; the tiny one under DDP, and under FSDP with the
meta-device load, on a fake world of 2; one
tiny RL epoch with small reward stand-ins, BP included) the step runs twice through
:func:`rtdmd.plan.simulate.simulate`: under ``FakeTensorMode`` (the simulation ``rtdmd plan`` uses
at real sizes) and for real in fp32, where ``torch.profiler`` (``profile_memory=True``) records
every CPU-allocator allocation and free; the running sum of those events is the measured peak.
Target: |simulated − measured| / measured < 10 %. The FLOPs of both runs are counted too.
"""
from __future__ import annotations

import sys
from pathlib import Path

TARGET = 0.10


def run(quick: bool, workdir: Path) -> dict:
    from rtdmd.plan.validate import compare

    names = ["tiny"] if quick else ["tiny", "sized", "tiny ddp×2", "tiny fsdp×2", "tiny rl"]
    rows = []
    for name in names:
        r = compare(name)
        rows.append({"case": name, "stage": r["stage"], "GPUs": r["world"], "width": r["heads"] * r["head_dim"],
                     "double+single blocks": f"{r['double']}+{r['single']}", "resolution": r["resolution"],
                     "per-GPU batch": r["batch"],
                     "simulated MiB": r["simulated_peak"] / 2 ** 20, "measured MiB": r["measured_peak"] / 2 ** 20,
                     "error %": 100 * r["rel_error"], "FLOPs equal": r["flops_sim"] == r["flops_real"]})
    worst = max(abs(r["error %"]) for r in rows) / 100
    return {"title": "Planner: simulated vs measured peak", "metric": "worst |simulated − measured| / measured",
            "value": worst, "target": f"< {TARGET:.0%}", "met": worst < TARGET, "threads": 1, "repeats": 1,
            "table": rows,
            "notes": ["measured = running sum of torch.profiler allocation events of the CPU allocator (not RSS)",
                      "simulated = rtdmd.plan tracker under FakeTensorMode, same code, same model, fp32"]}


def main(argv=None) -> int:
    from bench.common import item_main

    return item_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
