"""`make test` runs pytest-xdist with `--dist loadgroup` (tests/conftest.py): every folder whose
conftest builds session fixtures must stay on one worker, or the fixture is built once per worker
(a whole flow run twice) and two workers race on what it writes."""
from __future__ import annotations

import re

from conftest import ROOT, SESSION_FIXTURE_DIRS, xdist_group_of


def _dirs_with_session_fixtures() -> set[str]:
    found = set()
    for conftest in (ROOT / "tests").glob("*/conftest.py"):
        if re.search(r"scope\s*=\s*[\"']session[\"']", conftest.read_text()):
            found.add(conftest.parent.name)
    return found


def test_every_folder_with_session_fixtures_is_one_group():
    assert _dirs_with_session_fixtures() <= set(SESSION_FIXTURE_DIRS)
    for d in SESSION_FIXTURE_DIRS:
        files = sorted((ROOT / "tests" / d).rglob("test_*.py"))
        assert files, d
        assert {xdist_group_of(f) for f in files} == {d}


def test_other_folders_are_spread_file_by_file():
    a, b = ROOT / "tests" / "train" / "test_resume.py", ROOT / "tests" / "train" / "test_torchrun.py"
    assert xdist_group_of(a) == "train/test_resume.py" != xdist_group_of(b)
    assert xdist_group_of(ROOT / "tests" / "test_cli.py") == "test_cli.py"
