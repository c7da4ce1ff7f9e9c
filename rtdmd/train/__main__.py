"""``python -m rtdmd.train <stage> --config NAME_OR_PATH [key=value ...]`` (run under torchrun).

Builds the stage's trainer and runs it; re-running the same command resumes from the latest
complete checkpoint under ``--out``. Errors a user can fix (bad config, missing weights,
mismatched checkpoint, non-finite loss, an --out in use by another run, a full disk or read-only
--out) exit with status 2 and a one-line message. SIGTERM/SIGINT stop every rank after the same
step, write a checkpoint of it and exit with status 75 (``rtdmd.train.preemption``).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

STAGES = {"cold_start": "rtdmd.train.cold_start:ColdStartTrainer", "rl": "rtdmd.train.rl:RLTrainer"}


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m rtdmd.train", description=__doc__)
    ap.add_argument("stage", choices=sorted(STAGES))
    ap.add_argument("--config", required=True, help="backbone name (params/<name>.yaml) or a YAML path")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. cold_start.total_steps=10")
    ap.add_argument("--out", default=None, help="output dir or s3:// prefix (default outputs/<name>/<stage>)")
    ap.add_argument("--init", default=None, help="LoRA artifact URI to merge before training (stacking)")
    ap.add_argument("--allow-config-change", action="store_true", help="resume even if the config hash changed")
    ap.add_argument("--max-steps", type=int, default=None, help="stop this invocation at this global step")
    ap.add_argument("--preempt-grace-s", type=float, default=float(os.environ.get("RTDMD_PREEMPT_GRACE_S", 25)),
                    help="on SIGTERM/SIGINT, checkpoint and exit within this many seconds (default 25; "
                         "$RTDMD_PREEMPT_GRACE_S)")
    return ap.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from rtdmd.artifacts.fs import ArtifactError
    from rtdmd.backbones.base import BackboneError
    from rtdmd.config import ConfigError, load_params
    from rtdmd.config.bounds import check_cli_numbers
    from rtdmd.lora.core import LoraError
    from rtdmd import dist as D
    from rtdmd.progress import check_environment
    from rtdmd.train.base import NonFiniteLossError, RunOptions
    from rtdmd.train.checkpoint import CheckpointError
    from rtdmd.train.preemption import EXIT_PREEMPTED, Preempted, PreemptionGuard, exclusive_out

    user_errors = (ConfigError, BackboneError, CheckpointError, NonFiniteLossError, ArtifactError, LoraError)
    try:
        check_environment()  # $RTDMD_PROGRESS*
        check_cli_numbers(max_steps=args.max_steps)
        params = load_params(args.config, args.overrides)
        env = D.init_distributed(params, args.stage)  # checks the world size before any model is loaded
        module, cls = STAGES[args.stage].split(":")
        trainer_cls = getattr(importlib.import_module(module), cls)
        out = args.out or f"outputs/{params.name}/{args.stage}"
        opts = RunOptions(out=out, init=args.init, allow_config_change=args.allow_config_change,
                          max_steps=args.max_steps)
        guard = PreemptionGuard(args.preempt_grace_s)
        with exclusive_out(out, env, f"rtdmd.train {args.stage}"), guard:  # one writer; preemption-safe stop
            trainer = trainer_cls(params, opts, env)
            trainer.guard = guard
            trainer.run()
    except Preempted as exc:
        if env.is_main:
            print(f"preempted: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except OSError as exc:  # disk full, read-only or file-typed --out: no traceback
        print(f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:400]}", file=sys.stderr)
        return 2
    except user_errors as exc:
        print(f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r}", file=sys.stderr)
        return 2
    except ValueError as exc:  # e.g. a global batch not divisible by the world size
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        from rtdmd import dist as D

        D.teardown()
    return 0


if __name__ == "__main__":
    from rtdmd.dist import exit_process

    exit_process(main())  # skips the interpreter's ~1 s teardown (rtdmd.dist.exit_process)
