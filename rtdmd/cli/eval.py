"""``python -m rtdmd.eval``: the reward evaluation matrix (runs as is or under ``torchrun``).

    python -m rtdmd.eval --config tiny_flux2 --out runs/eval \\
        --variant teacher-8=teacher --variant teacher-4=teacher:steps=4 \\
        --variant rtdmd-4=lora:artifacts/run1/rl --reward-ckpt data/reward_ckpts/tiny
    torchrun --nproc_per_node 2 -m rtdmd.eval --config toy2d --out runs/toy --variant teacher-4=teacher:steps=4

Variant syntax: see ``rtdmd/eval/variants.py`` (``NAME=teacher|generator|lora[:ARGS]``). Params come
from ``params/<config>.yaml`` with dotted ``--override key=value`` (e.g. ``eval.num_prompts=8``).
Reward checkpoints: ``--reward-ckpt`` or ``$RTDMD_REWARD_CKPT_PATH``. Exit status 2 on bad input
(unknown reward or variant kind, missing dataset, empty prompt file, bad artifact) — reported before
any model is loaded.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rtdmd.cli.common import add_overrides, flat, parser, run
from rtdmd.config import load_params
from rtdmd.config.bounds import check_cli_numbers


def build_parser() -> argparse.ArgumentParser:
    ap = parser("python -m rtdmd.eval", __doc__)
    ap.add_argument("--config", required=True, help="backbone params name (params/<name>.yaml) or a YAML path")
    add_overrides(ap, "eval.num_prompts=8")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=SPEC", required=True,
                    help="model variant, repeatable: NAME=teacher|generator|lora[:ARGS] (see rtdmd/eval/variants.py)")
    ap.add_argument("--out", required=True, help="output directory (rank 0 writes metadata.json, table.*, grids)")
    ap.add_argument("--rewards", default=None, help="comma-separated reward names (default: eval.rewards)")
    ap.add_argument("--reward-ckpt", default=None, help="reward checkpoint directory (default: $RTDMD_REWARD_CKPT_PATH)")
    ap.add_argument("--samples-per-prompt", type=int, default=None, help="default: 1 (images), 512 (toy2d)")
    ap.add_argument("--batch-size", type=int, default=None, help="per-rank generation batch (default: eval.batch_size)")
    ap.add_argument("--grid-size", type=int, default=8, help="fixed-seed samples per dataset in the grids")
    ap.add_argument("--tilt-betas", default=None, help="toy2d: comma-separated beta grid for the tilted target")
    ap.add_argument("--no-images", action="store_true", help="do not write every generated image (grids only)")
    ap.add_argument("--allow-unavailable", action="store_true",
                    help="skip (and report) rewards whose scorer cannot be built instead of failing")
    ap.add_argument("--device", default=None, help="default: cuda:<LOCAL_RANK> when available, else cpu")
    ap.add_argument("--quiet", action="store_true", help="do not print the table")
    return ap


def _betas(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(b) for b in text.split(",")]
    except ValueError:
        raise ValueError(f"--tilt-betas {text!r} must be comma-separated numbers") from None


def evaluate(args) -> int:
    check_cli_numbers(samples_per_prompt=args.samples_per_prompt, batch_size=args.batch_size)
    params = load_params(args.config, flat(args.override))
    from rtdmd.eval.matrix import run_matrix  # lazy (torch): --help and bad params stay fast

    rewards = [r.strip() for r in args.rewards.split(",") if r.strip()] if args.rewards else None
    run_matrix(params, args.variant, args.out, rewards, reward_ckpt_dir=args.reward_ckpt, device=args.device,
               samples_per_prompt=args.samples_per_prompt, save_images=not args.no_images, grid_size=args.grid_size,
               allow_unavailable=args.allow_unavailable, tilt_betas=_betas(args.tilt_betas), batch_size=args.batch_size)
    if int(os.environ.get("RANK", "0")) == 0 and not args.quiet:
        print((Path(args.out) / "table.md").read_text())
    return 0


def main(argv=None) -> int:
    return run(build_parser(), argv, evaluate)


if __name__ == "__main__":
    sys.exit(main())
