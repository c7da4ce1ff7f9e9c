"""The golden traces are reproduced bit for bit (see ``tests/golden/traces.py``)."""
from __future__ import annotations

import json

import pytest

from .traces import CASES, compare, path_for, run_case


@pytest.mark.parametrize("case", CASES)
def test_golden_trace_is_bit_identical(case, tmp_path, monkeypatch):
    monkeypatch.setenv("RTDMD_REWARD_CKPT_PATH", "")
    expected = json.loads(path_for(case).read_text())
    got = run_case(case, tmp_path)
    assert len(got["metrics"]) == expected["steps"] == 20
    diffs = compare(expected, got)
    assert not diffs, f"{case} drifted from its golden trace:\n" + "\n".join(diffs[:20])


def test_compare_reports_a_one_ulp_change():
    expected = json.loads(path_for("toy2d-cold_start").read_text())
    changed = json.loads(json.dumps(expected))
    row = changed["metrics"][5]
    key = next(k for k in row if k != "step")
    import math

    row[key] = math.nextafter(row[key], math.inf)
    assert compare(expected, changed) == [f"step {row['step']} {key}: {expected['metrics'][5][key]!r} != {row[key]!r}"]
