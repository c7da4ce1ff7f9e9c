"""Item 7 — real scale without a GPU: the project's own training step simulated at real sizes.

Each row is ``rtdmd plan --backbone B --stage S`` (:mod:`rtdmd.plan`) at the reference GPU count of
``params/<B>.yaml`` (``compute.<stage>``): ``ColdStartTrainer.setup()`` + one iteration with the
generator turn run under ``FakeTensorMode`` with a fake process group of that world size (FSDP2 /
DDP wrapping is the real code path), the real architectures of :mod:`rtdmd.plan.facts`, and a
storage tracker giving the per-GPU peak by phase (load, rollout, fake update, generator update,
rest of the step) — measured from the tensors the code allocates and frees, not arithmetic. The
planner's trustworthiness is item 8 (``bench/plan_validation.py``).

``--quick`` simulates the "tiny" validation model on a fake 8-rank FSDP world instead (same code
path, seconds instead of minutes). This item is the cold-start row per backbone at the default
layout; the full table (both stages, shared base on and off, smallest GPU count) is
``python -m bench.plan_table`` (README "Will it fit?").
"""
from __future__ import annotations

import sys
from pathlib import Path

GPU_GIB = 80.0
HEADROOM = 0.10


def _row(r: dict) -> dict:
    from rtdmd.plan.simulate import GiB

    row = {"backbone": r["backbone"], "stage": r["stage"], "GPUs": f"{r['nodes']}×{r['gpus_per_node']}",
           "strategy": r["strategy"], "per-GPU batch": r["per_gpu_batch"]}
    for ph in ("load", "rollout", "fake_update", "generator_update", "other"):
        row[f"{ph} GiB"] = r["peak_by_phase"].get(ph, 0) / GiB
    row.update({"peak GiB": r["peak_bytes"] / GiB, "resident after load GiB": r["resident_after_load"] / GiB,
                f"fits {GPU_GIB:.0f} GiB −{HEADROOM:.0%}": r["fits"],
                "PFLOP/step/GPU": r["flops_per_step_per_gpu"] / 1e15,
                "s/step at 40% H100": r["step_seconds_at_mfu"]})
    return row


def run(quick: bool, workdir: Path) -> dict:
    from rtdmd.config import load_params
    from rtdmd.plan.cli import H100_BF16_TFLOPS, verdict
    from rtdmd.plan.facts import KEYS
    from rtdmd.plan.simulate import simulate, stage_overrides

    rows = []
    if quick:
        from rtdmd.plan.validate import FLUX2_VALIDATION, flux2_spec, validation_params

        v = FLUX2_VALIDATION["tiny"]
        p = validation_params(v["resolution"], 8 * v["batch"], ["distributed.strategy=fsdp"])
        r = simulate(p, "cold_start", nodes=1, gpus_per_node=8,
                     spec=flux2_spec(v["heads"], v["head_dim"], v["double"], v["single"]))
        rows.append(_row(verdict(r, GPU_GIB, HEADROOM, H100_BF16_TFLOPS, 0.4)))
    else:
        for key in KEYS:
            p = load_params(key, stage_overrides("cold_start"))
            c = p.compute.cold_start
            r = simulate(p, "cold_start", nodes=int(c.nodes), gpus_per_node=int(c.gpus_per_node))
            rows.append(_row(verdict(r, GPU_GIB, HEADROOM, H100_BF16_TFLOPS, 0.4)))
    fits = sum(1 for r in rows if r.get(f"fits {GPU_GIB:.0f} GiB −{HEADROOM:.0%}"))
    return {"title": "Real-scale simulation (rtdmd plan)", "metric": f"configs that fit {GPU_GIB:.0f} GiB with "
            f"{HEADROOM:.0%} headroom", "value": f"{fits}/{len(rows)}", "target": "table (no target)", "met": None,
            "threads": 1, "repeats": 1, "table": rows,
            "notes": ["peaks are per GPU (rank 0 of the simulated world), tracked tensor storages only: CUDA context, "
                      "kernel workspaces and allocator fragmentation are what the headroom is for",
                      "cold start: one iteration with the generator turn, random stop at its worst case S = K",
                      "stage 2 (RL epochs): python -m bench.plan_table --stages rl"]}


def main(argv=None) -> int:
    from bench.common import item_main

    return item_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
