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
