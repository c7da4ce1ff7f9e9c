"""Does fusing the method's per-sample arithmetic pay on CPU? ``torch.compile`` vs eager, by shape.

The toy2d step÷floor gap (:mod:`bench.step_floor`) is non-network arithmetic: hundreds of small
tensor ops per iteration (CPS transitions, log-probs, the AC fake-score loss), each a few µs of
dispatch. This script measures whether compiling such a region (inductor, ``dynamic=False``)
beats running it eagerly, on the project's own functions, at toy2d shapes (``[B, 2]``) and at
image-latent shapes, for a grad pass (forward + backward) and a no-grad pass; eager and compiled
calls alternate, medians over ``reps`` pairs. It also says whether the compiled results are
bit-identical to eager (what the golden traces would need) and their largest difference
(relative to the largest magnitude of each output).

Regions (inputs drawn once; the network output ``v`` is an input, as the compiled region would
sit between network calls):

* ``cps``: per-sample-σ CPS transition with given noise + simplified log-prob (§2.1, §2.2) —
  ``cps_step`` then ``cps_log_prob``; grad w.r.t. ``v``;
* ``ac``: the AC fake-score loss of one renoised sub-interval (§5.3–§5.5) —
  ``subinterval_forward_target`` then ``ac_fake_loss``; grad w.r.t. ``v``.

Usage: ``python -m bench.fused_math [--quick] [--json]``. Not a ``make bench`` item: it
measures an option that does not exist yet (see the README, "Where the step time goes").
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from rtdmd.algorithms.ac_dmd import ac_fake_loss, subinterval_forward_target
from rtdmd.algorithms.cps import cps_log_prob, cps_step

ETA = 0.9
SHAPES_FULL = ((128, 2), (384, 2), (2, 16384), (8, 16384))
SHAPES_QUICK = ((128, 2),)


def cps_region(x, v, s, s_next, noise):
    out = cps_step(x, v, s, s_next, ETA, noise=noise)
    return out.sum() + cps_log_prob(out, x, v, s, s_next, ETA, simplified=True).sum()


def ac_region(x, v, s, t, noise):
    _, target, scale = subinterval_forward_target(x, noise, s, t)
    return ac_fake_loss(v, target, scale)


REGIONS = {"cps": cps_region, "ac": ac_region}


def _inputs(b: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, v, z = (torch.randn(b, d, generator=g) for _ in range(3))
    s = torch.rand(b, generator=g) * 0.8 + 0.1
    return x, v, s, s * 0.5, z


def _grad_call(fn, x, v0, s, s2, z):
    v = v0.clone().requires_grad_(True)
    out = fn(x, v, s, s2, z)
    out.backward()
    return out.detach(), v.grad


def _nograd_call(fn, x, v0, s, s2, z):
    with torch.no_grad():
        return (fn(x, v0, s, s2, z),)


def measure(region: str, b: int, d: int, reps: int) -> dict:
    eager = REGIONS[region]
    compiled = torch.compile(eager, dynamic=False)
    args = _inputs(b, d)
    row = {"region": region, "shape": [b, d]}
    for mode, call in (("grad", _grad_call), ("no_grad", _nograd_call)):
        t0 = time.perf_counter()
        ref, got = call(eager, *args), call(compiled, *args)  # the compiled call compiles here
        row[f"{mode}_compile_s"] = time.perf_counter() - t0
        row[f"{mode}_bit_identical"] = all(torch.equal(a, c) for a, c in zip(ref, got))
        row[f"{mode}_max_rel_diff"] = max(float((a - c).abs().max() / a.abs().max().clamp(min=1e-30))
                                          for a, c in zip(ref, got))
        for _ in range(5):
            call(compiled, *args)
        te, tc = [], []
        for _ in range(reps):  # alternate, so a change of machine load hits both
            for fn, ts in ((eager, te), (compiled, tc)):
                t = time.perf_counter()
                call(fn, *args)
                ts.append(time.perf_counter() - t)
        row[f"{mode}_eager_us"] = 1e6 * statistics.median(te)
        row[f"{mode}_compiled_us"] = 1e6 * statistics.median(tc)
        row[f"{mode}_ratio"] = row[f"{mode}_compiled_us"] / row[f"{mode}_eager_us"]
    return row


def run(quick: bool = False) -> list[dict]:
    torch.set_num_threads(1)
    shapes = SHAPES_QUICK if quick else SHAPES_FULL
    reps = 20 if quick else 300
    return [measure(r, b, d, reps if d < 1000 else max(10, reps // 5)) for r in REGIONS for b, d in shapes]


def table(rows: list[dict]) -> str:
    out = ["| region | shape | grad: eager µs | compiled µs | ratio | no-grad: eager µs | compiled µs | ratio "
           "| bit-identical (grad / no-grad) | max rel. diff |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['region']} | {r['shape'][0]}×{r['shape'][1]} | {r['grad_eager_us']:.0f} | "
                   f"{r['grad_compiled_us']:.0f} | {r['grad_ratio']:.2f} | {r['no_grad_eager_us']:.0f} | "
                   f"{r['no_grad_compiled_us']:.0f} | {r['no_grad_ratio']:.2f} | "
                   f"{'yes' if r['grad_bit_identical'] else 'no'} / {'yes' if r['no_grad_bit_identical'] else 'no'} | "
                   f"{max(r['grad_max_rel_diff'], r['no_grad_max_rel_diff']):.1e} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="toy2d shape only, few repeats")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    a = ap.parse_args(argv)
    rows = run(a.quick)
    print(json.dumps(rows, indent=1) if a.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
