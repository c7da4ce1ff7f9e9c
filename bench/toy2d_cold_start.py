"""toy2d cold-start benchmark: SWD and MMD to the 50-step teacher for teacher-4-Euler, DMD-4 and
AC-DMD-4 (students trained with ``params/toy2d.yaml``), averaged over classes and seeds.

    python bench/toy2d_cold_start.py [--seeds 0 1] [--n 2000] [--json OUT] [key=value overrides]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--n", type=int, default=2000, help="samples per class")
    ap.add_argument("--workers", type=int, default=2, help="parallel training processes")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("overrides", nargs="*", help="params overrides, e.g. cold_start.total_steps=300")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from rtdmd.eval.toy2d_proof import format_table, proof_metrics

    t0 = time.time()
    res = proof_metrics(seeds=args.seeds, n_per_class=args.n, overrides=args.overrides, workers=args.workers,
                        log=lambda m: print(m, file=sys.stderr))
    print(f"toy2d cold start: distance to the 50-step teacher (mean over 3 classes, seeds {args.seeds}, "
          f"{args.n} samples/class)")
    print(format_table(res))
    print(f"total {time.time() - t0:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
