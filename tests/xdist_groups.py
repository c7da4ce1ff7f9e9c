"""Which tests share a worker in parallel runs.

`make test` runs pytest-xdist with `--dist loadgroup`; tests/conftest.py marks every test with the
group named here. The tests of a folder whose conftest builds session fixtures (a whole flow run,
the digits models, a local S3 server, tiny DVC projects, reward checkpoints) share one worker, so
each fixture is built once; the tests of every other folder are spread file by file. (A module of
its own, not conftest.py: several folders have a conftest, so ``import conftest`` is ambiguous.)"""
from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent
SESSION_FIXTURE_DIRS = ("data", "digits", "eval", "flow", "registry", "rewards")


def xdist_group_of(path: Path) -> str:
    parts = Path(path).resolve().relative_to(TESTS).parts
    if len(parts) > 1 and parts[0] in SESSION_FIXTURE_DIRS:
        return parts[0]
    return "/".join(parts)
