"""The per-call-site aten op counter of bench/op_count.py."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# this folder is importable as ``bench`` under pytest and shadows the repository's: load by path
_SPEC = importlib.util.spec_from_file_location("bench_op_count", ROOT / "bench" / "op_count.py")
op_count = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(op_count)


def test_op_counter_classes_module_ops_as_network_and_the_rest_by_site():
    w = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    c = op_count.OpCounter()
    with torch.autograd.set_detect_anomaly(True, check_nan=False), c:
        y = w(x) * 2.0  # the module call is "network"; the multiply is outside it
        y.sum().backward()
    s = op_count.summary(c, top=5)
    assert s["network"] > 0 and s["optimizer"] == 0
    assert s["total"] == s["network"] + s["optimizer"] + s["outside"]
    # the multiply, the sum and their backward ops (attributed to their forward site via the anomaly
    # traceback) come from tests/, not rtdmd/: no repository site, so "other"
    assert dict(s["top"]) == {"other": s["outside"]} and s["outside"] >= 4


@pytest.mark.slow
def test_toy2d_cold_start_cycle_outside_ops_by_site():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RTDMD_PROGRESS": "off"}
    res = subprocess.run([sys.executable, "-m", "bench.op_count", "--stage", "cold_start", "--top", "300"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    head = re.search(r"total (\d+) aten ops; network (\d+), optimizer (\d+), outside (\d+)", res.stdout)
    total, network, optimizer, outside = map(int, head.groups())
    assert total == network + optimizer + outside and network > 0 and optimizer > 0
    sites = dict((s, int(n)) for n, s in re.findall(r"^\s*(\d+)  (\S+:\d+ \S+)$", res.stdout, re.M))
    assert sum(sites.values()) == outside
    assert any(k.startswith("rtdmd/algorithms/cps.py:") for k in sites)  # the CPS steps are outside work
    # the rollout's float sigmas reuse their memoised [B] vectors (memos stay on under the counter)
    assert not any("sigma_vector" in k for k in sites), sites
