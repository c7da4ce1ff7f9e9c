"""bench.plan_table on a tiny configuration: both sharing layouts, the saving, resumable JSON."""
import importlib.util
import json
from pathlib import Path

import pytest

from rtdmd.plan.validate import FLUX2_VALIDATION, flux2_spec

# this folder is importable as ``bench`` under pytest and shadows the repository's: load by path
_SPEC = importlib.util.spec_from_file_location(
    "plan_table", Path(__file__).resolve().parents[2] / "bench" / "plan_table.py")
plan_table = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(plan_table)
main = plan_table.main

TINY = ["distributed.strategy=none", "model.resolution=32", "cold_start.global_batch_size=2",
        "compute.cold_start.gpus_per_node=1"]


@pytest.mark.slow
def test_table_script_on_a_tiny_config(tmp_path, capsys):
    v = FLUX2_VALIDATION["tiny"]
    spec = flux2_spec(v["heads"], v["head_dim"], v["double"], v["single"])
    js, md = tmp_path / "t.json", tmp_path / "t.md"
    argv = ["--backbones", "tiny_flux2", "--stages", "cold_start", "--json", str(js), "--md", str(md)]
    for s in TINY:
        argv += ["--set", s]
    assert main(argv, spec=spec) == 0
    rows = {r["share_base"]: r for r in json.loads(js.read_text())["rows"]}
    assert set(rows) == {True, False} and not any("error" in r for r in rows.values())
    on, off = rows[True], rows[False]
    # one frozen base instead of three (teacher, generator, fake score): less resident after load
    assert on["resident_after_load"] < off["resident_after_load"]
    assert on["peak_bytes"] <= off["peak_bytes"]
    text = md.read_text()
    assert "shared frozen base" in text and "separate copies" in text and "not searched" in text
    # both layouts and the smallest-count table; the stage cell names the overrides (not a reference row)
    assert text.count("| tiny_flux2 | cold_start [distributed.strategy=none, ") == 3
    before = js.read_text()
    assert main(argv, spec=spec) == 2  # an existing table is not overwritten without --force / --resume
    assert js.read_text() == before
    assert main(argv + ["--resume"], spec=spec) == 0  # nothing left to run
    assert json.loads(js.read_text())["rows"] == json.loads(before)["rows"]
    # --min-gpus on a finished table: only the search runs (one GPU fits: nothing else simulated)
    assert main(argv + ["--resume", "--min-gpus"], spec=spec) == 0
    rows = {r["share_base"]: r for r in json.loads(js.read_text())["rows"]}
    assert rows[True]["min_gpus"]["world"] == 1 and "min_gpus" not in rows[False]
    assert rows[True]["peak_bytes"] == on["peak_bytes"]
    assert "| tiny_flux2 | cold_start [distributed.strategy=none, model.resolution=32, cold_start.global_batch_size=2, " \
           "compute.cold_start.gpus_per_node=1] | 1 | 1 |" in md.read_text()


def test_a_chunk_limited_search_passes_the_limit_to_every_probe_and_the_table_says_so():
    from unittest import mock

    from rtdmd.config import load_params
    from rtdmd.plan import simulate as S
    from rtdmd.plan.cli import min_gpus_search
    from rtdmd.plan.simulate import GiB, stage_overrides

    params = load_params("flux2_4b", stage_overrides("rl"))
    seen = []

    def fake_simulate(p, stage, *, nodes, gpus_per_node, **kw):
        seen.append((nodes * gpus_per_node, kw.get("chunk_limit"), kw.get("flops")))
        return {"peak_bytes": int((200 / (nodes * gpus_per_node) + 20) * GiB)}  # fits from 4 GPUs on

    with mock.patch.object(S, "simulate", fake_simulate):
        mg = min_gpus_search(params, "rl", 2, 8, 30 * GiB, 72 * GiB, at_least=2, chunk_limit=2)
    assert mg["world"] == 4 and mg["chunk_limit"] == 2 and "first 2 chunks" in mg["method"]
    assert seen and all(lim == 2 and flops is False for _, lim, flops in seen)
    assert {w for w, _, _ in seen} >= {2, 3, 4}  # the answer and the count below it were simulated
    row = {"backbone": "flux2_4b", "stage": "rl", "share_base": True, "overrides": [], "world": 16,
           "nodes": 2, "gpus_per_node": 8, "strategy": "fsdp", "per_gpu_batch": 6, "peak_bytes": 30 * GiB,
           "peak_by_phase": {"load": 20 * GiB}, "limit_bytes": 72 * GiB, "fits": True,
           "flops_counted": False, "min_gpus": mg}
    line = [ln for ln in plan_table.markdown([row]).splitlines() if ln.startswith("| flux2_4b | rl | 16 |")]
    assert len(line) == 1 and "| 4 |" in line[0] and "cut to their first 2 chunks" in line[0]
