"""Loggers (rank-0 JSONL, null elsewhere, optional MLflow) and the EMA precision option."""
from __future__ import annotations

import json
import re

import pytest
import torch

from rtdmd.train.logging import JsonlLogger, NullLogger, build_logger

from .helpers import make_trainer


def test_rank0_gets_jsonl_others_null(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert isinstance(build_logger(1, str(tmp_path)), NullLogger)
    lg = build_logger(0, str(tmp_path))
    assert isinstance(lg, JsonlLogger)
    lg.log_metrics(3, {"a/b": 1.5, "bad": float("nan")})
    lg.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row == {"step": 3, "a/b": 1.5, "bad": "nan"}


def test_mlflow_logger_only_with_tracking_uri(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    lg = build_logger(0, str(tmp_path / "out"), "toy2d-cold_start")
    lg.log_params({"cold_start": {"seed": 0}})
    lg.log_metrics(1, {"fake/ac": 0.5})
    lg.close()
    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1 and float(runs.iloc[0]["metrics.fake/ac"]) == 0.5
    assert runs.iloc[0]["params.cold_start.seed"] == "0"


def test_stage_run_gets_system_metrics_and_slash_names(tmp_path, monkeypatch):
    """The trainer continues the flow's stage run (MLFLOW_RUN_ID): its metrics keep their ``/``
    and the run gets MLflow's system metrics while the trainer runs."""
    pytest.importorskip("mlflow")
    import time

    from rtdmd.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = Tracker(uri, "rtdmd-toy2d")
    parent = tr.parent_run("lr1", "RtdmdFlow", {})
    stage = tr.stage_run(parent, "lr1", "cold_start")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_RUN_ID", stage)
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    lg = build_logger(0, str(tmp_path / "out"), "toy2d-cold_start")
    lg.log_metrics(1, {"fake/ac": 0.5, "fake/ac/grad_norm": 2.0})
    deadline = time.time() + 60  # the monitor thread logs every 0.2 s (slow on a loaded machine)
    while time.time() < deadline and len(tr.client.get_metric_history(stage, "system/cpu_utilization_percentage")) < 2:
        time.sleep(0.2)
    lg.close()
    metrics = tr.get_run(stage).data.metrics
    assert metrics["fake/ac"] == 0.5 and metrics["fake/ac/grad_norm"] == 2.0 and "fake.ac" not in metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    assert len(tr.client.get_metric_history(stage, "system/cpu_utilization_percentage")) >= 2


def test_metrics_jsonl_and_params_written_on_rank0(tmp_path, capsys):
    from rtdmd.train.logging import JsonlLogger as J

    trainer = make_trainer("toy2d", tmp_path, ["cold_start.global_batch_size=8", "cold_start.total_steps=4",
                                                "cold_start.log_interval=2", "cold_start.eval_interval=2"])
    trainer.logger = J(tmp_path / "metrics.jsonl")
    trainer.run()
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "fake/ac" in r]
    assert steps == [2, 4]
    assert any("eval/swd" in r for r in rows) and (tmp_path / "params.json").is_file()
    assert any("fake/ac/grad_norm" in r and "fake/consistency/grad_norm" in r for r in rows)
    # the progress bar: total, rate, the headline losses of the last logging step; plain lines on stderr
    last = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("cold_start:")][-1]
    assert re.match(r"cold_start: 100%\|#+\| 4/4 \[.*(step/s|s/step), .*fake/ac=[-\d.e]+\]$", last), last


@pytest.mark.parametrize("dtype,torch_dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_ema_dtype_option_and_resume(tmp_path, dtype, torch_dtype):
    ov = ["cold_start.global_batch_size=8", "cold_start.total_steps=4", "cold_start.eval_interval=0",
          "cold_start.checkpoint.save_interval=2", f"cold_start.ema_dtype={dtype}"]
    first = make_trainer("toy2d", tmp_path, ov)
    first.opts.max_steps = 2
    first.run()
    assert {v.dtype for v in first.ema.shadow.values()} == {torch_dtype}
    second = make_trainer("toy2d", tmp_path, ov)
    second.run()
    assert second.step == 4 and {v.dtype for v in second.ema.shadow.values()} == {torch_dtype}
    assert all(p.dtype == torch.float32 for p in second.roles.lora_params("generator").values())  # fp32 master
