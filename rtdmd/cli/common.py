"""The one preamble of every command line (``rtdmd``, ``python -m rtdmd.infer``, ``python -m rtdmd.eval``).

Conventions: argparse parsers with examples in the epilog; dotted params overrides as
``--override KEY=VALUE ...`` (repeatable); logging at INFO. Bad user input — a wrong value, file,
model reference, artifact, reward or an unreachable service — prints ONE line
``<prog>: error: <message>`` on stderr and exits with status 2, without a traceback; anything else
is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from rtdmd.progress import check_environment

# Errors that mean "your input is wrong", by qualified class name: matching by name keeps the CLI
# from importing torch-heavy modules just to name their error classes.
USER_ERRORS = frozenset({
    "builtins.ValueError",  # ConfigError, VariantError, EvalInputError, EmptyPromptsError, LoraError, ...
    "builtins.FileNotFoundError",  # MissingDatasetError, missing checkpoints / prompt files
    "rtdmd.artifacts.fs.ArtifactError",
    "rtdmd.backbones.base.BackboneError",
    "rtdmd.registry.errors.RegistryError",
    "rtdmd.rewards.errors.RewardError",
    "rtdmd.tracking.TrackingError",
    "rtdmd.pipeline.errors.PipelineError",
})
# Service errors (MLflow, network, disk): one line with the exception type, also exit 2.
SERVICE_ERRORS = ("mlflow.",)

Handler = Callable[[argparse.Namespace], int]


def is_user_error(exc: BaseException) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" in USER_ERRORS for c in type(exc).__mro__)


def error_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if is_user_error(exc):
        return text.splitlines()[0] if text else type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else repr(exc)}"


def is_reportable(exc: BaseException) -> bool:
    """A user or service error (one line, exit 2) rather than a bug (traceback)."""
    return is_user_error(exc) or isinstance(exc, OSError) or type(exc).__module__.startswith(SERVICE_ERRORS)


def add_overrides(p: argparse.ArgumentParser, example: str = "eval.num_prompts=8") -> None:
    p.add_argument("--override", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                   help=f"dotted params overrides, repeatable (e.g. {example})")


def flat(groups: Sequence[Sequence[str]]) -> list[str]:
    """``--override a=1 b=2 --override c=3`` -> ``[a=1, b=2, c=3]``."""
    return [kv for g in groups for kv in g]


def parser(prog: str, doc: str | None, **kw) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   **kw)


def run(ap: argparse.ArgumentParser, argv: Sequence[str] | None, handler: Handler | None = None, *,
        log: bool = True) -> int:
    """Parse ``argv``, run ``handler(args)`` (default: ``args.func``) and turn user errors into exit 2."""
    args = ap.parse_args(argv)
    if log:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        check_environment()  # $RTDMD_PROGRESS*: a bad value is refused before any work
        return int((handler or args.func)(args) or 0)
    except KeyboardInterrupt:
        print(f"{ap.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is the user's (or a service's) fault
        if not is_reportable(exc):
            raise
        print(f"{ap.prog}: error: {error_line(exc)}", file=sys.stderr)
        return 2
