"""``python -m rtdmd.train <stage> --config NAME_OR_PATH [key=value ...]`` (run under torchrun).

Builds the stage's trainer and runs it; re-running the same command resumes from the latest
complete checkpoint under ``--out``. Errors a user can fix (bad config, missing weights,
mismatched checkpoint, non-finite loss) exit with status 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import importlib
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
    return ap.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from rtdmd.artifacts.fs import ArtifactError
    from rtdmd.backbones.base import BackboneError
    from rtdmd.config import ConfigError, load_params
    from rtdmd.lora.core import LoraError
    from rtdmd import dist as D
    from rtdmd.train.base import NonFiniteLossError, RunOptions
    from rtdmd.train.checkpoint import CheckpointError

    user_errors = (ConfigError, BackboneError, CheckpointError, NonFiniteLossError, ArtifactError, LoraError)
    try:
        params = load_params(args.config, args.overrides)
        env = D.init_distributed(params, args.stage)  # checks the world size before any model is loaded
        module, cls = STAGES[args.stage].split(":")
        trainer_cls = getattr(importlib.import_module(module), cls)
        out = args.out or f"outputs/{params.name}/{args.stage}"
        opts = RunOptions(out=out, init=args.init, allow_config_change=args.allow_config_change,
                          max_steps=args.max_steps)
        trainer_cls(params, opts, env).run()
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
    sys.exit(main())
