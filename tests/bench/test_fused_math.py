"""bench/fused_math.py: compiled regions of the method's arithmetic agree with eager, and the report says how well."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# this folder is importable as ``bench`` under pytest and shadows the repository's: load by path
_SPEC = importlib.util.spec_from_file_location("bench_fused_math", ROOT / "bench" / "fused_math.py")
fused_math = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fused_math)


def test_the_regions_compute_what_their_algorithm_functions_compute():
    """The CPS region is the project's own transition: its value is the sample's sum plus the
    sum of its simplified log-probs (§2.1, §2.2), with a non-zero gradient w.r.t. v."""
    x, v, s, s2, z = fused_math._inputs(4, 2)
    out, grad = fused_math._grad_call(fused_math.cps_region, x, v, s, s2, z)
    s_, s2_ = s.reshape(-1, 1), s2.reshape(-1, 1)
    x0, eps = x - s_ * v, x + (1 - s_) * v
    th = fused_math.ETA * torch.pi / 2
    mu = (1 - s2_) * x0 + s2_ * torch.cos(torch.tensor(th)) * eps
    nxt = mu + s2_ * torch.sin(torch.tensor(th)) * z
    log_prob = -((nxt - mu) ** 2).mean(dim=1)  # simplified: −mean_D (x' − μ)², no 1/ρ²
    torch.testing.assert_close(out, nxt.sum() + log_prob.sum())
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.slow
def test_compiled_regions_match_eager_within_fp32_tolerance_and_the_table_reports_each():
    rows = [fused_math.measure(r, 16, 2, reps=2) for r in fused_math.REGIONS]
    assert [r["region"] for r in rows] == ["cps", "ac"]
    for r in rows:
        for mode in ("grad", "no_grad"):
            assert r[f"{mode}_max_rel_diff"] < 1e-5, (r["region"], mode, r[f"{mode}_max_rel_diff"])
            assert r[f"{mode}_eager_us"] > 0 and r[f"{mode}_compiled_us"] > 0
            assert r[f"{mode}_ratio"] == pytest.approx(r[f"{mode}_compiled_us"] / r[f"{mode}_eager_us"])
    text = fused_math.table(rows)
    assert text.count("\n") == 3 and "| cps | 16×2 |" in text and "| ac | 16×2 |" in text
