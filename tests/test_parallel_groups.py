"""`make test` runs pytest-xdist with `-n 2 --dist loadscope` (tests/xdist_groups.py): every folder
whose conftest builds session fixtures must stay on one worker, or the fixture is built once per
worker (a whole flow run twice) and two workers race on what it writes."""
from __future__ import annotations

import re
import subprocess
import sys

from xdist_groups import SESSION_FIXTURE_DIRS, TESTS, group_of_nodeid, xdist_group_of


def _dirs_with_session_fixtures() -> set[str]:
    found = set()
    for conftest in TESTS.glob("*/conftest.py"):
        if re.search(r"scope\s*=\s*[\"']session[\"']", conftest.read_text()):
            found.add(conftest.parent.name)
    return found


def test_every_folder_with_session_fixtures_is_one_group():
    assert _dirs_with_session_fixtures() <= set(SESSION_FIXTURE_DIRS)
    for d in SESSION_FIXTURE_DIRS:
        files = sorted((TESTS / d).rglob("test_*.py"))
        assert files, d
        assert {xdist_group_of(f) for f in files} == {d}


def test_other_folders_are_spread_file_by_file():
    a, b = TESTS / "train" / "test_resume.py", TESTS / "train" / "test_torchrun.py"
    assert xdist_group_of(a) == "train/test_resume.py" != xdist_group_of(b)
    assert xdist_group_of(TESTS / "test_cli.py") == "test_cli.py"
    assert group_of_nodeid("tests/flow/test_flow_local.py::test_x[a-b]", TESTS.parent) == "flow"


def test_two_workers_keep_a_session_fixture_folder_on_one_worker():
    """The real run: two workers and two files of tests/eval. Plain loadscope gives each worker one
    file; the folder scheduler gives the folder to one worker and stops the other."""
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-n", "2",
                          "--dist", "loadscope", "tests/eval/test_prompts.py", "tests/eval/test_variants.py"],
                         cwd=TESTS.parent, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    ran = re.findall(r"\[(gw\d+)\] .*PASSED (tests/eval/test_\w+\.py)::", res.stdout)
    assert {f for _, f in ran} == {"tests/eval/test_prompts.py", "tests/eval/test_variants.py"}, res.stdout[-2000:]
    assert len({w for w, _ in ran}) == 1, ran  # every eval test on the same worker
