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
    ap.add_argument("--min-gpus", action="store_true",
                    help="also search the smallest GPU count that fits (binary search by simulation)")
    ap.add_argument("--max-gpus", type=int, default=None, help="upper bound of the --min-gpus search (default 64)")
    ap.add_argument("--chunk-limit", type=int, default=None, metavar="N",
                    help="memory-only simulations (the --min-gpus probes; the main one with --no-flops): RL's "
                         "chunked loops run their first N chunks (same peak, less time; README \"Will it fit?\")")
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
    if r.get("chunk_limit"):
        lines.append(f"  RL chunked loops simulated by their first {r['chunk_limit']} chunks")
    mg = r.get("min_gpus")
    if mg is not None:
        probes = ", ".join(f"{p['world']}: {p['peak_bytes'] / GiB:.1f} GiB" for p in mg["probes"])
        lay = mg["layout"]
        found = f"none up to {max(mg['candidates'])}" if lay is None else f"{lay[0] * lay[1]} ({lay[0]}×{lay[1]})"
        limited = f"; chunk limit {mg['chunk_limit']}" if mg.get("chunk_limit") else ""
        lines.append(f"  smallest GPU count  {found} (simulated: {probes}{limited})")
    lines += [f"  note: {n}" for n in r.get("notes", [])]
    return "\n".join(lines)


def notes(params) -> list[str]:
    """What the simulated peak cannot tell apart for these params (printed with the verdict)."""
    out = []
    if params.model.encoders_device == "cpu_offload":
        out.append("model.encoders_device=cpu_offload: the simulated device is the CPU, so the text encoders' "
                   "host copy is counted as GPU memory; the peak is an upper bound")
    return out


def min_gpus_search(params, stage: str, nodes: int, gpn: int, known_peak: int, limit: float,
                    max_gpus: int | None = None, collect: bool = False, at_least: int | None = None,
                    chunk_limit: int | None = None) -> dict:
    """The smallest GPU count whose simulated peak is ``≤ limit`` (:mod:`rtdmd.plan.search`, up to
    ``max_gpus``, default the larger of 64 and ``nodes × gpn``); ``known_peak``: the peak already
    simulated at ``nodes × gpn``; ``at_least``: a known lower bound of the answer; ``chunk_limit``:
    the probes' RL chunked loops simulated by their first chunks
    (:func:`rtdmd.plan.simulate.limited_chunks`)."""
    from rtdmd.plan.search import candidate_layouts, smallest_fitting
    from rtdmd.plan.simulate import simulate

    known = {(nodes, gpn): known_peak}

    def peak_of(n: int, g: int) -> int:
        if (n, g) not in known:
            known[(n, g)] = simulate(params, stage, nodes=n, gpus_per_node=g, collect=collect,
                                     flops=False, chunk_limit=chunk_limit)["peak_bytes"]
        return known[(n, g)]

    layouts = candidate_layouts(params, stage, gpn, max_gpus or max(64, nodes * gpn))
    found = smallest_fitting(layouts, peak_of, limit, at_least)
    lay = found["layout"]
    method = "binary search over the accepted GPU counts, one simulation per probe"
    if at_least is not None:
        method += f"; counts below the lower bound {at_least} not simulated"
    if chunk_limit is not None and stage == "rl":
        method += f"; RL chunked loops simulated by their first {chunk_limit} chunks"
    return {"world": None if lay is None else lay[0] * lay[1], "layout": lay,
            "candidates": [n * g for n, g in layouts], "probes": found["probes"], "method": method,
            "at_least": at_least, "chunk_limit": chunk_limit if stage == "rl" else None}


def plan(params, stage: str, nodes: int, gpn: int, *, gpu_memory: float = 80.0, headroom: float = 0.10,
         gpu_tflops: float = H100_BF16_TFLOPS, mfu: float = 0.4, flops: bool = True, collect: bool = False,
         min_gpus: bool = False, max_gpus: int | None = None, at_least: int | None = None,
         chunk_limit: int | None = None) -> dict:
    """Simulate ``params`` / ``stage`` on ``nodes × gpn`` GPUs and judge it; with ``min_gpus`` also
    search the smallest GPU count that fits (:func:`min_gpus_search`). ``chunk_limit`` applies to the
    memory-only simulations: the search's probes, and the main one when ``flops`` is off."""
    from rtdmd.plan.simulate import simulate

    main_limit = None if flops or stage != "rl" else chunk_limit
    report = verdict(simulate(params, stage, nodes=nodes, gpus_per_node=gpn, collect=collect, flops=flops,
                              chunk_limit=main_limit), gpu_memory, headroom, gpu_tflops, mfu)
    said = notes(params)
    if said:
        report["notes"] = said
    if min_gpus:
        report["min_gpus"] = min_gpus_search(params, stage, nodes, gpn, report["peak_bytes"], report["limit_bytes"],
                                             max_gpus, collect, at_least, chunk_limit)
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rtdmd.config import load_params
    from rtdmd.plan.facts import FAMILY
    from rtdmd.plan.simulate import stage_overrides

    if args.backbone not in FAMILY:
        print(f"rtdmd plan: error: --backbone {args.backbone!r} has no real configuration to simulate; "
              f"expected one of {', '.join(FAMILY)}", file=sys.stderr)
        return 2
    try:
        params = load_params(args.backbone, stage_overrides(args.stage) + list(args.set))
        comp = getattr(params.compute, args.stage)
        nodes = args.nodes or int(comp.nodes)
        gpn = args.gpus_per_node or int(comp.gpus_per_node)
        if nodes < 1 or gpn < 1:
            raise ValueError(f"--nodes {nodes} and --gpus-per-node {gpn} must be ≥ 1")
        if args.max_gpus is not None and args.max_gpus < 1:
            raise ValueError(f"--max-gpus {args.max_gpus} must be ≥ 1")
        if args.chunk_limit is not None:
            if args.chunk_limit < 1:
                raise ValueError(f"--chunk-limit {args.chunk_limit} must be ≥ 1")
            if args.stage != "rl":
                raise ValueError("--chunk-limit applies to the rl stage's chunked loops; cold_start has none")
            if not (args.no_flops or args.min_gpus):
                raise ValueError("--chunk-limit applies to memory-only simulations; add --no-flops or --min-gpus")
        params.check_world_size(nodes * gpn, args.stage)
    except (ValueError, KeyError, TypeError) as e:
        print(f"rtdmd plan: error: {e}", file=sys.stderr)
        return 2
    report = plan(params, args.stage, nodes, gpn, gpu_memory=args.gpu_memory, headroom=args.headroom,
                  gpu_tflops=args.gpu_tflops, mfu=args.mfu, flops=not args.no_flops,
                  collect=args.gc_between_phases, min_gpus=args.min_gpus, max_gpus=args.max_gpus,
                  chunk_limit=args.chunk_limit)
    print(json.dumps(report, indent=2) if args.json else format_text(report))
    return 0
