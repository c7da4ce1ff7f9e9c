"""The smallest GPU count at which a configuration fits, found by simulation.

Candidates are the world sizes the configuration accepts (``params.check_world_size``: the global
batch divides evenly, with the per-GPU batch rules of the stage), laid out as the reference lays
out nodes: ``W ≤ G`` GPUs on one node, larger ``W`` as ``W / G`` nodes of ``G`` GPUs (``G`` = the
params' ``gpus_per_node``; counts that are not a multiple of ``G`` above one node are skipped).

Method: binary search over the ascending candidates up to ``max_world``, one simulation per probe
(memory only), assuming the per-GPU peak does not grow with the GPU count — it does not in this
code: FSDP shards the transformers ``1/W`` and the per-GPU batch is ``global / W``; what is
replicated (text encoders, VAE, reward models, DDP's LoRA buckets) is the same at every ``W``.
At most ``⌈log2(n + 1)⌉`` simulations for ``n`` candidates. The answer is checked, not
extrapolated: the returned count was simulated and fits, and the next smaller candidate was
simulated and does not (unless the answer is the smallest candidate).

With a lower bound ``at_least`` (a count below which the configuration is known not to fit, e.g.
the answer of the same configuration with fewer RL sampling batches per epoch, whose peak can only
be lower: more batches only add stored samples), candidates below it are not simulated and the
bound itself is probed first, as the likely answer; the rest is the same binary search.
"""
from __future__ import annotations

from typing import Callable


def candidate_layouts(params, stage: str, gpus_per_node: int, max_world: int) -> list[tuple[int, int]]:
    """``(nodes, gpus_per_node)`` for every accepted world size ``≤ max_world``, ascending."""
    out = []
    for w in range(1, max_world + 1):
        if w > gpus_per_node and w % gpus_per_node:
            continue
        try:
            params.check_world_size(w, stage)
        except ValueError:
            continue
        out.append((1, w) if w <= gpus_per_node else (w // gpus_per_node, gpus_per_node))
    return out


def smallest_fitting(layouts: list[tuple[int, int]], peak_of: Callable[[int, int], int], limit: float,
                     at_least: int | None = None) -> dict:
    """Binary search of ``layouts`` (ascending) for the first whose ``peak_of(nodes, gpn) ≤ limit``;
    ``at_least``: skip the counts below it and probe the first one at or above it first.

    Returns ``{"layout": (nodes, gpn) or None, "probes": [{"nodes", "gpus_per_node", "world",
    "peak_bytes", "fits"}, ...]}`` (``None``: not even the largest candidate fits).
    """
    if at_least is not None:
        layouts = [lay for lay in layouts if lay[0] * lay[1] >= at_least]
    probes: list[dict] = []
    lo, hi, best = 0, len(layouts) - 1, None
    first = at_least is not None
    while lo <= hi:
        mid = lo if first else (lo + hi) // 2
        first = False
        nodes, gpn = layouts[mid]
        peak = int(peak_of(nodes, gpn))
        fits = peak <= limit
        probes.append({"nodes": nodes, "gpus_per_node": gpn, "world": nodes * gpn, "peak_bytes": peak,
                       "fits": fits})
        if fits:
            best, hi = mid, mid - 1
        else:
            lo = mid + 1
    return {"layout": None if best is None else layouts[best], "probes": probes}
