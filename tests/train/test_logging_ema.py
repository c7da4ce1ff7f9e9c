"""Loggers (rank-0 JSONL, null elsewhere, optional MLflow) and the EMA precision option."""
from __future__ import annotations

import json

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
    assert len(runs) == 1 and float(runs.iloc[0]["metrics.fake.ac"]) == 0.5
    assert runs.iloc[0]["params.cold_start.seed"] == "0"


def test_metrics_jsonl_and_params_written_on_rank0(tmp_path):
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
