"""``python -m rtdmd.infer``: prompts → PNG images for any LoRA regime and sampler settings
(library call: :func:`rtdmd.eval.infer.run_inference`).

    python -m rtdmd.infer --config flux2_4b --prompt "a red bicycle" --out out/base          # no LoRA
    python -m rtdmd.infer --config flux2_4b --lora artifacts/run1/cold_start --prompt ... --out out/cs
    python -m rtdmd.infer --config flux2_4b --lora artifacts/run1/rl --prompt ... --out out/rl  # cold start + RL
    python -m rtdmd.infer --config flux2_4b --teacher --steps 50 --guidance 4 --prompt ... --out out/teacher
    torchrun --nproc_per_node 2 -m rtdmd.infer --config tiny_flux2 --prompt-file prompts.txt --out out/x

LoRA regimes (data_and_eval.md §4.3): no ``--lora`` runs the base generator; each ``--lora URI``
(repeatable; a local artifact dir or ``s3://`` URI) is merged into the base weights in order. An
RL artifact records its cold-start parent, so ``--lora <rl>`` alone merges cold start then RL
(checksums verified); ``--no-chain`` merges only the listed artifacts. Sampling: CPS over
``sampler.step_list`` (or ``--steps N`` evenly spaced / ``--step-list 1000,750,...``) with
``--eta`` (default ``sampler.eta``); ``--teacher`` samples the teacher with Euler and CFG
``--guidance`` (default ``sampler.teacher_guidance``). Sample ``i`` uses seed ``--seed + i``, so an
image does not depend on batch size or the number of processes (up to float rounding in batched
kernels: at most one grey level on rare pixels).

Writes ``{index:06d}.png`` (toy2d: ``points.csv``), ``grid.png`` and ``metadata.json`` (the spec's
schema: ``config``, ``num_images``, ``time_seconds_sum``; plus the prompts, sampler settings and
artifact checksums) into ``--out``. Exit status 2 on bad input (no prompts, bad artifact, ...).
"""
from __future__ import annotations

import argparse
import os
import sys

from rtdmd.cli.common import add_overrides, flat, parser, run
from rtdmd.config import load_params
from rtdmd.config.bounds import check_cli_numbers


def build_parser() -> argparse.ArgumentParser:
    ap = parser("python -m rtdmd.infer", __doc__)
    ap.add_argument("--config", required=True, help="backbone params name (params/<name>.yaml) or a YAML path")
    add_overrides(ap, "sampler.eta=0.5")
    ap.add_argument("--lora", action="append", default=[], metavar="URI",
                    help="LoRA artifact to merge (repeatable, in order); its parent chain is merged first")
    ap.add_argument("--no-chain", action="store_true", help="merge only the listed artifacts, not their parents")
    ap.add_argument("--teacher", action="store_true", help="sample the teacher (Euler + CFG) instead of the generator")
    ap.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    ap.add_argument("--prompt-file", default=None, help="prompt file (.txt / .jsonl / .json), after --prompt")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--steps", type=int, default=None, help="number of sampling steps (evenly spaced)")
    ap.add_argument("--step-list", default=None, help="explicit comma-separated timesteps, e.g. 1000,750,500,250")
    ap.add_argument("--eta", type=float, default=None, help="CPS eta in [0, 1] (default: sampler.eta; teacher: 0)")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (default: 1 for the generator)")
    ap.add_argument("--seed", type=int, default=42, help="sample i uses seed + i")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--samples-per-prompt", type=int, default=1)
    ap.add_argument("--device", default=None)
    return ap


def _step_list(args) -> list[float] | None:
    if args.steps is not None and args.step_list:
        raise ValueError("give --steps or --step-list, not both")
    if not args.step_list:
        return None
    try:
        return [float(s) for s in args.step_list.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--step-list {args.step_list!r} must be comma-separated numbers") from None


def infer(args) -> int:
    check_cli_numbers(steps=args.steps, eta=args.eta, guidance=args.guidance, seed=args.seed,
                      batch_size=args.batch_size, samples_per_prompt=args.samples_per_prompt)
    params = load_params(args.config, flat(args.override))
    step_list = _step_list(args)
    from rtdmd.eval.infer import run_inference  # lazy (torch): --help and bad params stay fast

    meta = run_inference(params, args.prompt, args.out, prompt_file=args.prompt_file, lora=args.lora,
                         teacher=args.teacher, steps=args.steps, step_list=step_list, eta=args.eta,
                         guidance=args.guidance, chain=not args.no_chain, seed=args.seed,
                         batch_size=args.batch_size, samples_per_prompt=args.samples_per_prompt, device=args.device)
    if meta is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {meta['num_images']} samples to {args.out} "
              f"({meta['variant']['spec']}, {meta['time_seconds_sum']:.2f}s)")
    return 0


def main(argv=None) -> int:
    return run(build_parser(), argv, infer)


if __name__ == "__main__":
    sys.exit(main())
