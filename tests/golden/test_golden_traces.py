"""The golden traces are reproduced: bit for bit on a CPU kind that has its own traces, within the
cross-kind tolerance on any other (see ``tests/golden/traces.py``)."""
from __future__ import annotations

import itertools
import json
import math

import pytest

from . import traces
from .traces import (CASES, CROSS_KIND_ATOL, CROSS_KIND_RTOL, STEPS, check, compare, compare_close, path_for,
                     recorded_kinds, run_case)


def _load(case: str, kind: str) -> dict:
    return json.loads(path_for(case, kind).read_text())


@pytest.mark.parametrize("case", CASES)
def test_golden_trace_is_reproduced(case, tmp_path, monkeypatch):
    monkeypatch.setenv("RTDMD_REWARD_CKPT_PATH", "")
    got = run_case(case, tmp_path)
    assert len(got["metrics"]) == STEPS == 20
    how, diffs = check(case, got)
    assert not diffs, f"{case} drifted from its golden trace ({how}):\n" + "\n".join(diffs[:20])


def test_a_kind_without_traces_of_its_own_is_checked_against_every_recorded_kind(monkeypatch):
    """The fallback path of ``check`` (no run: a recorded trace stands in for a fresh one)."""
    kinds = recorded_kinds()
    got = _load("toy2d-rl", kinds[0])
    monkeypatch.setattr(traces, "cpu_kind", lambda: "othervendor-avx2")
    how, diffs = check("toy2d-rl", got)
    assert diffs == [] and how.startswith("othervendor-avx2 has no traces") and all(k in how for k in kinds)
    got["metrics"][4]["dm/loss"] *= 1.01
    how, diffs = check("toy2d-rl", got)
    assert {d.split("]")[0] + "]" for d in diffs} == {f"[{k}]" for k in kinds}  # reported against each kind


def test_every_recorded_kind_has_every_case_and_the_kinds_agree_within_the_tolerance():
    kinds = recorded_kinds()
    assert "authenticamd-avx512" in kinds and "genuineintel-avx512" in kinds
    for case in CASES:
        for a, b in itertools.combinations(kinds, 2):
            assert compare_close(_load(case, a), _load(case, b)) == [], (case, a, b)
            assert compare(_load(case, a), _load(case, b)) != []  # different kinds: the bits do differ


def test_compare_reports_a_one_ulp_change():
    expected = _load("toy2d-cold_start", recorded_kinds()[0])
    changed = json.loads(json.dumps(expected))
    row = changed["metrics"][5]
    key = next(k for k in row if k != "step")
    row[key] = math.nextafter(row[key], math.inf)
    assert compare(expected, changed) == [f"step {row['step']} {key}: {expected['metrics'][5][key]!r} != {row[key]!r}"]


def test_compare_close_reports_a_change_of_the_maths_but_not_a_rounding():
    expected = _load("toy2d-rl", recorded_kinds()[0])
    rounded, changed = json.loads(json.dumps(expected)), json.loads(json.dumps(expected))
    key = "dm/loss"
    rounded["metrics"][7][key] *= 1 + 1e-5
    changed["metrics"][7][key] *= 1.01  # a 1 % change, as a wrong coefficient would make
    assert compare_close(expected, rounded) == []
    assert compare_close(expected, changed) == [
        f"step {expected['metrics'][7]['step']} {key}: {expected['metrics'][7][key]!r} vs {changed['metrics'][7][key]!r} "
        f"(beyond rtol {CROSS_KIND_RTOL}, atol {CROSS_KIND_ATOL})"]
    del changed["metrics"][3]["dm/loss"]
    assert any("metric keys differ" in d for d in compare_close(expected, changed))
