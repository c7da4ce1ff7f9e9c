"""Repo-wide test settings: one thread (2 shared cores), offline hubs, repo root as cwd."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _repo_root_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


# --- background prebuild of the digits models -------------------------------------------------
# The digits build (tests/digits/assets.py) is about five minutes of one core on a fresh clone, and
# most of the suite before tests/digits uses one core of two. When the run collects tests that use
# the digits fixtures and their models are missing, the build starts at collection in a separate
# process and overlaps the tests before them. The digits fixtures wait for it under the same build
# lock, and rebuild in the foreground what it did not finish (where a failure shows).
# RTDMD_TEST_PREBUILD=0 turns this off.
_prebuild: dict = {}


def pytest_collection_finish(session):
    if os.environ.get("RTDMD_TEST_PREBUILD", "1") == "0" or session.config.option.collectonly:
        return
    used = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    from digits.assets import missing, parts_for  # tests/digits/assets.py, stdlib only (tests/ is on sys.path)

    parts = parts_for(used)
    if not parts or not missing(parts):
        return
    log = ROOT / "data" / "digits" / "prebuild.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        _prebuild["proc"] = subprocess.Popen([sys.executable, str(ROOT / "tests" / "digits" / "assets.py"), *parts],
                                             cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def pytest_sessionfinish(session):
    proc = _prebuild.pop("proc", None)
    if proc is not None and proc.poll() is None:  # e.g. -x stopped the run before tests/digits
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the build and its step process (own session)
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=30)
                return
            except ProcessLookupError:  # it ended on its own meanwhile
                return
            except subprocess.TimeoutExpired:
                continue
