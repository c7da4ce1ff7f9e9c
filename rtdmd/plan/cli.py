"""``python -m rtdmd.plan`` / ``rtdmd plan``: will this fit on my cluster, and how long is a step at best?

Runs :func:`rtdmd.plan.simulate.simulate` (the real training step on fake tensors) and prints the
per-GPU peak by phase, whether it fits ``--gpu-memory`` with ``--headroom`` to spare, the FLOPs per
step per GPU and the implied step time at ``--gpu-tflops`` × ``--mfu``.
"""
from __future__ import annotations

import argparse
import json
import sys

from rtdmd.plan.simulate import GiB, PHASES

H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rtdmd plan", description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", required=True, help="params name (flux2_4b, flux2_9b, sd3m, sd35m, flux1_dev)")
    ap.add_argument("--stage", required=True, choices=("cold_start", "rl"))
    ap.add_argument("--nodes", type=int, default=None, help="default: params compute.<stage>.nodes")
    ap.add_argument("--gpus-per-node", type=int, default=None, help="default: params compute.<stage>.gpus_per_node")
    ap.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    ap.add_argument("--headroom", type=float, default=0.10, help="fraction of --gpu-memory kept free (default 0.10)")
    ap.add_argument("--gpu-tflops", type=float, default=H100_BF16_TFLOPS, help="peak TFLOP/s per GPU (default H100 bf16)")
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the time estimate (default 0.4)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override (repeatable)")
    ap.add_argument("--gc-between-phases", action="store_true",
                    help="gc.collect() at every phase switch (frees tensors held only by reference cycles)")
    ap.add_argument("--no-flops", action="store_true",
                    help="memory only: skip the FLOP formulas (FLOPs and step time are not reported)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    return ap


def verdict(report: dict, gpu_gib: float, headroom: float, tflops: float, mfu: float) -> dict:
    limit = gpu_gib * (1.0 - headroom) * GiB
    out = dict(report)
    out.update({"gpu_memory_gib": gpu_gib, "headroom": headroom, "limit_bytes": limit,
                "fits": report["peak_bytes"] <= limit,
                "step_seconds_at_mfu": report["flops_per_step_per_gpu"] / (tflops * 1e12 * mfu),
                "gpu_tflops": tflops, "mfu": mfu})
    return out


def format_text(r: dict) -> str:
    lines = [f"{r['backbone']} {r['stage']}: {r['nodes']}×{r['gpus_per_node']} GPUs ({r['strategy']}), "
             f"per-GPU batch {r['per_gpu_batch']}"]
    for ph in PHASES:
        if ph in r["peak_by_phase"]:
            lines.append(f"  peak {ph:<17} {r['peak_by_phase'][ph] / GiB:8.2f} GiB")
    lines.append(f"  peak overall        {r['peak_bytes'] / GiB:8.2f} GiB of {r['gpu_memory_gib']:.0f} GiB "
                 f"({r['headroom']:.0%} headroom kept): {'fits' if r['fits'] else 'DOES NOT FIT'}")
    if r.get("flops_counted", True):
        lines.append(f"  FLOPs/step/GPU      {r['flops_per_step_per_gpu'] / 1e15:8.2f} PFLOP → "
                     f"{r['step_seconds_at_mfu']:.1f} s at {r['mfu']:.0%} of {r['gpu_tflops']:.0f} TFLOP/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rtdmd.config import load_params
    from rtdmd.plan.facts import FAMILY
    from rtdmd.plan.simulate import simulate, stage_overrides

    if args.backbone not in FAMILY:
        print(f"rtdmd plan: error: --backbone {args.backbone!r} has no real configuration to simulate; "
              f"expected one of {', '.join(FAMILY)}", file=sys.stderr)
        return 2
    if args.stage == "rl":
        print("rtdmd plan: error: --stage rl is not simulated yet (the stage-2 reward models have no stand-ins); "
              "use --stage cold_start", file=sys.stderr)
        return 2
    try:
        params = load_params(args.backbone, stage_overrides(args.stage) + list(args.set))
        comp = getattr(params.compute, args.stage)
        nodes = args.nodes or int(comp.nodes)
        gpn = args.gpus_per_node or int(comp.gpus_per_node)
        if nodes < 1 or gpn < 1:
            raise ValueError(f"--nodes {nodes} and --gpus-per-node {gpn} must be ≥ 1")
        params.check_world_size(nodes * gpn, args.stage)
    except (ValueError, KeyError, TypeError) as e:
        print(f"rtdmd plan: error: {e}", file=sys.stderr)
        return 2
    report = verdict(simulate(params, args.stage, nodes=nodes, gpus_per_node=gpn,
                              collect=args.gc_between_phases, flops=not args.no_flops),
                     args.gpu_memory, args.headroom, args.gpu_tflops, args.mfu)
    print(json.dumps(report, indent=2) if args.json else format_text(report))
    return 0
