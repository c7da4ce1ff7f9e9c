"""Which tests share a worker in parallel runs.

`make test` runs pytest-xdist with `-n 2 --dist loadscope`, and tests/conftest.py replaces
loadscope's scheduler with :class:`FolderScheduling`, whose work units are the groups named here.
The tests of a folder whose conftest builds session fixtures (a whole flow run, the digits models,
a local S3 server, tiny DVC projects, reward checkpoints) are one unit, so each fixture is built
once, on one worker; the tests of every other folder are spread file by file.

Why a scheduler and not ``--dist loadgroup`` with ``xdist_group`` marks: xdist 3.8 groups by
rewriting ``item._nodeid``, which pytest 9 no longer reads, so the marks are silently ignored.
(A module of its own, not conftest.py: several folders have a conftest, so ``import conftest`` is
ambiguous.)"""
from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent
SESSION_FIXTURE_DIRS = ("data", "digits", "eval", "flow", "registry", "rewards")


def xdist_group_of(path: Path) -> str:
    try:
        parts = Path(path).resolve().relative_to(TESTS).parts
    except ValueError:  # a test outside tests/: its own unit
        return str(path)
    if len(parts) > 1 and parts[0] in SESSION_FIXTURE_DIRS:
        return parts[0]
    return "/".join(parts)


def group_of_nodeid(nodeid: str, rootdir: Path) -> str:
    return xdist_group_of(Path(rootdir) / nodeid.split("::", 1)[0])


def make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class FolderScheduling(LoadScopeScheduling):
        """loadscope with the units of :func:`xdist_group_of` (dispatched largest first)."""

        def _split_scope(self, nodeid: str) -> str:
            return group_of_nodeid(nodeid, config.rootpath)

    return FolderScheduling(config, log)
