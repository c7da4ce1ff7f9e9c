"""toy2d RTDMD benchmark: mean reward, mode coverage and distances to the reward-tilted target.

    python bench/toy2d_rl.py [--init COLD_START_ARTIFACT] [--cold-start-steps 1500] [--seed 0]
                             [--workdir DIR] [key=value overrides for params/toy2d.yaml ...]

Without ``--init`` a cold-start artifact is trained first with the stage-1 trainer
(``cold_start.total_steps`` = ``--cold-start-steps``).  Then RTDMD and the three ablations
(GRPO only, BP only, no final-step AC-DMD) are trained from it with the ``rl`` section of
``params/toy2d.yaml`` and every sampler is measured (:mod:`rtdmd.eval.toy2d_rl_proof`):
teacher-50, teacher-4, cold-start-4, RTDMD-4, the ablations and an independent draw of the
tilted target at the best-fit β (the noise floor of the distances).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default=None, help="existing toy2d cold-start artifact (skip stage 1)")
    ap.add_argument("--cold-start-steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0, help="evaluation seed")
    ap.add_argument("--samples", type=int, default=2000, help="samples per class")
    ap.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir)")
    ap.add_argument("overrides", nargs="*", help="params/toy2d.yaml overrides for the RL runs, e.g. rl.epochs=80")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from rtdmd.eval.toy2d_rl_proof import check_claims, format_table, run_proof, train_cold_start

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        t0 = time.time()
        init = args.init
        if init is None:
            init = train_cold_start(work / "cold_start", overrides=[f"cold_start.total_steps={args.cold_start_steps}",
                                                                    f"cold_start.checkpoint.save_interval={args.cold_start_steps}"])
            print(f"cold start ({args.cold_start_steps} steps): {time.time() - t0:.1f}s", file=sys.stderr)
        t1 = time.time()
        result = run_proof(work / "rl", init, n=args.samples, seed=args.seed, overrides=args.overrides,
                           log=lambda m: print(m, file=sys.stderr))
        print(format_table(result))
        print(f"claims: {check_claims(result)}")
        print(f"RL + evaluation seconds: {time.time() - t1:.1f} (total {time.time() - t0:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
