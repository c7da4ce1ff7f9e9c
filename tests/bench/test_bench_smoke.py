"""Smoke test of the benchmark runner: two cheap items at --quick sizes write the results files
with the expected keys (the numbers themselves are measured by `make bench`, never asserted)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

ITEM_KEYS = {"title", "metric", "value", "target", "met", "table", "notes", "seconds", "item"}


def test_bench_quick_subset_writes_results(tmp_path):
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--only", "artifacts,real_scale",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    took = time.time() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    meta = data["meta"]
    assert meta["quick"] is True and meta["items"] == ["artifacts", "real_scale"]
    assert meta["machine"]["nproc"] >= 1 and meta["machine"]["cpu_model"]
    assert set(data["results"]) == {"artifacts", "real_scale"}
    for name, item in data["results"].items():
        assert "error" not in item, (name, item.get("error"))
        assert ITEM_KEYS <= set(item), (name, ITEM_KEYS - set(item))
        assert item["table"], name
    art = data["results"]["artifacts"]
    assert isinstance(art["met"], bool) and art["value"] > 0
    assert art["artifact"]["bytes_per_adapter_formula"] == 4 * art["artifact"]["lora_numel_per_adapter"]
    md = (tmp_path / "results.md").read_text()
    assert "## Summary" in md and "Artifact throughput" in md and "cores" in md
    assert took < 120, f"quick subset took {took:.0f}s (budget 60 s on a quiet machine)"
