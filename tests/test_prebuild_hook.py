"""The background digits build of ``tests/conftest.py``: started only when the run needs the digits
models and they are missing, with only the parts the selected fixtures use; stopped (its whole
process group) when the session ends before it does."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hooks(request, monkeypatch, tmp_path):
    """tests/conftest.py as pytest loaded it, with Popen recorded and ROOT (the log's home) in tmp_path."""
    mod = next(p for p in request.config.pluginmanager.get_plugins()
               if getattr(p, "__file__", None) == str(ROOT / "tests" / "conftest.py"))
    started = []
    monkeypatch.setattr(mod, "subprocess", SimpleNamespace(STDOUT=subprocess.STDOUT,
                                                           Popen=lambda argv, **kw: started.append((argv, kw)) or "proc"))
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    monkeypatch.setattr(mod, "_prebuild", {})
    monkeypatch.delenv("RTDMD_TEST_PREBUILD", raising=False)
    return mod, started


def _session(*fixtures, collectonly=False):
    return SimpleNamespace(config=SimpleNamespace(option=SimpleNamespace(collectonly=collectonly)),
                           items=[SimpleNamespace(fixturenames=["tmp_path", f]) for f in fixtures])


def _missing(monkeypatch, *absent):
    import digits.assets as assets  # the module the hook imports (tests/ is on sys.path)

    monkeypatch.setattr(assets, "missing", lambda parts: [p for p in parts if p in absent])


@pytest.mark.parametrize("fixtures,parts", [(("digits_assets",), ["vae", "pipeline", "rewards"]),
                                            (("digits_rewards", "digits_assets"), ["vae", "pipeline", "rewards"]),
                                            (("digits_rewards",), ["rewards"])])
def test_the_build_starts_at_collection_with_the_parts_the_selected_tests_use(hooks, monkeypatch, tmp_path, fixtures, parts):
    mod, started = hooks
    _missing(monkeypatch, "vae", "pipeline", "rewards")
    mod.pytest_collection_finish(_session(*fixtures))
    (argv, kw), = started
    assert argv[1:] == [str(tmp_path / "tests" / "digits" / "assets.py"), *parts] and argv[0] == sys.executable
    assert kw["start_new_session"] and kw["cwd"] == tmp_path  # its own process group, killable as one
    assert (tmp_path / "data" / "digits" / "prebuild.log").is_file() and mod._prebuild["proc"] == "proc"


@pytest.mark.parametrize("case", ["no digits fixture", "models present", "turned off", "collect only"])
def test_no_build_starts_when_the_run_does_not_need_it(hooks, monkeypatch, tmp_path, case):
    mod, started = hooks
    _missing(monkeypatch, *(() if case == "models present" else ("vae", "pipeline", "rewards")))
    if case == "turned off":
        monkeypatch.setenv("RTDMD_TEST_PREBUILD", "0")
    session = _session(*(() if case == "no digits fixture" else ("digits_assets",)), collectonly=case == "collect only")
    mod.pytest_collection_finish(session)
    assert started == [] and mod._prebuild == {} and not (tmp_path / "data").exists()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_session_end_stops_the_build_and_its_step_process(hooks):
    mod, _ = hooks
    proc = subprocess.Popen(["bash", "-c", "sleep 120 & echo $!; wait"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # a build (bash) running a step (sleep), as the hook starts it
    child = int(proc.stdout.readline())
    mod._prebuild["proc"] = proc
    mod.pytest_sessionfinish(None)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is not None and not _alive(child) and mod._prebuild == {}


def test_session_end_leaves_a_finished_build_alone(hooks):
    mod, _ = hooks
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    mod._prebuild["proc"] = proc
    mod.pytest_sessionfinish(None)  # no kill of a process group that may be gone (or reused)
    assert proc.returncode == 0 and mod._prebuild == {}
