"""Progress bars (rtdmd.progress): rank 0 only, plain lines in a log, the $RTDMD_PROGRESS knob.

The bars of the real loops are checked where those loops run already: the training loop in
tests/train/test_logging_ema.py and (2 ranks) tests/train/test_torchrun.py, the RL rollout in
tests/train/test_rl_tiny.py, the evaluation loop in tests/eval/test_matrix.py.
"""
from __future__ import annotations

import re

import pytest

from rtdmd.progress import ProgressConfigError, check_environment, enabled, log_interval, postfix, progress


def _count(n: int, **kw) -> None:
    bar = progress(n, "work", **kw)
    for _ in range(n):
        bar.update(1)
    bar.close()


def test_rank0_writes_whole_lines_with_rate_and_total_to_stderr(capsys, monkeypatch):
    monkeypatch.delenv("RTDMD_PROGRESS", raising=False)
    _count(5, rank=0, unit="step")
    out, err = capsys.readouterr()
    assert out == "" and "\r" not in err and "\x1b" not in err  # a log gets plain lines
    last = err.splitlines()[-1]
    assert re.match(r"work: 100%\|#+\| 5/5 \[\d\d:\d\d<00:00, +[\d.]+(step/s|s/step)\]$", last), last
    assert err.splitlines()[0].startswith("work:   0%")


def test_other_ranks_and_off_write_nothing(capsys, monkeypatch):
    _count(5, rank=1)
    for off in ("0", "off", "False"):
        monkeypatch.setenv("RTDMD_PROGRESS", off)
        _count(5, rank=0)
    assert capsys.readouterr() == ("", "")


def test_transient_bar_shows_only_when_it_outlasts_the_interval(capsys, monkeypatch):
    _count(3, rank=0, leave=False)  # default 30 s: too short to show
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RTDMD_PROGRESS_INTERVAL", "0.000001")
    _count(3, rank=0, leave=False)
    assert "work:" in capsys.readouterr().err


@pytest.mark.parametrize("var,value", [("RTDMD_PROGRESS", "maybe"), ("RTDMD_PROGRESS_INTERVAL", "0"),
                                       ("RTDMD_PROGRESS_INTERVAL", "soon"), ("RTDMD_PROGRESS_INTERVAL", "inf")])
def test_bad_values_are_refused(var, value, monkeypatch):
    monkeypatch.setenv(var, value)
    with pytest.raises(ProgressConfigError, match=rf"\${var}='{value}' is not understood"):
        check_environment()


def test_knob_values():
    assert enabled({}) and enabled({"RTDMD_PROGRESS": " ON "}) and not enabled({"RTDMD_PROGRESS": "false"})
    assert log_interval({}) == 30.0 and log_interval({"RTDMD_PROGRESS_INTERVAL": "2.5"}) == 2.5
    assert postfix({"fake/ac": 0.123456, "other": 1.0}) == {"fake/ac": "0.1235"}


def test_trainer_cli_refuses_a_bad_knob_before_any_work(tmp_path, capsys, monkeypatch):
    from rtdmd.train.__main__ import main

    monkeypatch.setenv("RTDMD_PROGRESS", "loud")
    rc = main(["cold_start", "--config", "toy2d", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines() == [
        "error: $RTDMD_PROGRESS='loud' is not understood: expected on or off (or 1/0, true/false)"]
    assert not (tmp_path / "out").exists()
