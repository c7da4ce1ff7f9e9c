"""The GPU check kit (``python -m bench.gpu_check``): its no-GPU behaviour, its argument errors, the
report arithmetic, the planner adapter, the budget, and the CPU dry run of every phase in an
environment that hides the packages the GPU machine does not have."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _import_real_bench(*names):
    """Under pytest's default import mode this folder (``tests/bench``, a package) is importable as
    ``bench`` and shadows the repository's ``bench``: import the real modules with the repository
    root first on ``sys.path``, then put the test package back."""
    shadow = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "bench" or k.startswith("bench.")}
    sys.path.insert(0, str(ROOT))
    try:
        return [importlib.import_module(f"bench.{n}") for n in names]
    finally:
        sys.path.remove(str(ROOT))
        for k in [k for k in sys.modules if k == "bench" or k.startswith("bench.")]:
            del sys.modules[k]
        sys.modules.update(shadow)


gpu_check, gpu_check_plan, gpu_check_report, gpu_check_worker = _import_real_bench(
    "gpu_check", "gpu_check_plan", "gpu_check_report", "gpu_check_worker")
render_md, summarise = gpu_check_report.render_md, gpu_check_report.summarise
# what the GPU machine lacks among the packages installed here (diffusers travels as a wheel)
ABSENT_ON_GPU_MACHINE = ("boto3", "botocore", "s3transfer", "mlflow", "metaflow", "metaflow_torchrun", "dvc",
                         "great_expectations", "open_clip", "moto", "kubernetes", "rapidocr", "rapidfuzz",
                         "pytesseract")


def test_without_cuda_one_line_and_exit_status(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: False)
    out = tmp_path / "rep"
    assert gpu_check.main(["--out", str(out)]) == 0
    assert capsys.readouterr().out == "no CUDA device: GPU checks skipped\n"
    assert gpu_check.main(["--out", str(out), "--require-gpu"]) == 1
    assert capsys.readouterr().out == "no CUDA device: GPU checks skipped\n"
    assert not out.exists()  # nothing written


def test_bad_arguments_exit_2_and_keep_existing_report(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--steps", "2"]) == 2
    assert "--steps 2" in capsys.readouterr().err
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--bf16-masters", "lora"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    (tmp_path / "gpu_check.json").write_text("{\"old\": 1}")
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == {"old": 1}


def test_error_line_finds_the_rank_error_not_torchrun_wrapper():
    log = ("[cold_start] training steps 0 -> 2\nTraceback (most recent call last):\n  File \"x.py\", line 3\n"
           "TypeError: DistributedDataParallel.__init__() got an unexpected keyword argument 'forward_sync_buffers'\n"
           "E1204 torch.distributed.elastic.multiprocessing.api: failed (exitcode: 1)\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n============\n")
    assert gpu_check.error_line(log).startswith("TypeError: DistributedDataParallel")
    assert gpu_check.error_line("just a line\n") == "just a line"
    assert gpu_check.error_line("") == "(no output)"


def test_summarise_mfu_memory_ratio_failures_and_markdown():
    rep = {"mode": "gpu", "env": {"peak_tflops": 800.0, "gpu": "NVIDIA H200"},
           "phases": {"env": {"status": "ok"}, "nccl": {"status": "skipped: budget"}},
           "stages": [{"job": "mid/fp32_masters/cold_start", "status": "ok", "achieved_tflops": 400.0,
                       "train_peak_gib": 12.0, "flops_per_step": 2e15, "plan": {"status": "ok", "peak_gib": 10.0}},
                      {"job": "mid/bf16_masters/rl", "status": "skipped: budget", "reason": "needs ≈60 s"}],
           "launch": [{"name": "launch/cold_start", "status": "failed", "error": "TypeError: boom"}]}
    summarise(rep)
    ok = rep["stages"][0]
    assert ok["mfu"] == pytest.approx(0.5) and ok["measured_over_planned"] == pytest.approx(1.2)
    assert rep["failures"] == ["launch/cold_start: TypeError: boom"]
    assert set(rep["skipped"]) == {"nccl", "mid/bf16_masters/rl"}
    assert rep["verdict"] == "1 failure(s), 2 skipped"
    md = render_md(rep)
    assert "| mid/fp32_masters/cold_start | ok |" in md and "TypeError: boom" in md and "NVIDIA H200" in md


def test_planner_adapter_reads_the_peak_or_says_why_not(monkeypatch):
    monkeypatch.setattr(gpu_check_plan, "planner_available", lambda: False)
    assert gpu_check_plan.planned_peak("tiny_flux2", [], "rl", 1)["status"] == "planner not available"

    monkeypatch.setattr(gpu_check_plan, "planner_available", lambda: True)
    answers = []

    def fake_run(cmd, **kw):
        answers.append(cmd)
        return subprocess.CompletedProcess(cmd, *replies.pop(0))

    monkeypatch.setattr(gpu_check_plan.subprocess, "run", fake_run)
    replies = [(0, "log line\n{\"phases\": {\"train\": {\"peak_gib\": 12.5}}}\n", ""),
               (0, "{\"peak_bytes\": 2147483648}", ""), (0, "{\"other\": 1}", ""), (1, "", "error: bad stage\n"),
               (2, "", "rtdmd plan: error: --backbone 'tiny_flux2' has no real configuration to simulate\n")]
    assert gpu_check_plan.planned_peak("tiny_flux2", ["a.b=1"], "rl", 2) == {"status": "ok", "peak_gib": 12.5}
    assert answers[0][-7:] == ["--nodes", "1", "--gpus-per-node", "2", "--json", "--set", "a.b=1"]
    assert gpu_check_plan.planned_peak("x", [], "rl", 1) == {"status": "ok", "peak_gib": 2.0}
    assert gpu_check_plan.planned_peak("x", [], "rl", 1)["status"] == "planner output not understood"
    bad = gpu_check_plan.planned_peak("x", [], "rl", 1)
    assert bad["status"] == "planner failed" and "bad stage" in bad["detail"]
    refused = gpu_check_plan.planned_peak("tiny_flux2", [], "cold_start", 1)
    assert refused["status"] == "not plannable" and "no real configuration" in refused["detail"]


def test_probe_warms_up_counts_flops_of_step_1_and_times_the_rest():
    import torch

    class Loop:  # the shape of Trainer.run: self.setup(), then self.train_step() per step
        def __init__(self):
            self.step, self.calls = 0, []

        def setup(self):
            self.calls.append("setup")

        def train_step(self):
            a = torch.ones(8, 16)
            a @ torch.ones(16, 4)
            self.calls.append(self.step)
            return {}

        def run(self, n):
            self.setup()
            while self.step < n:
                self.train_step()
                self.step += 1

    loop = Loop()
    probe = gpu_check_worker.Probe(loop)
    loop.run(5)
    assert loop.calls == ["setup", 0, 1, 2, 3, 4]
    assert probe.flops == 2 * 8 * 16 * 4 and len(probe.times) == 3 and probe.load_s is not None


def _blocker(tmp: Path) -> str:
    """A ``sitecustomize`` that hides the packages the GPU machine lacks (import fails as there)."""
    d = tmp / "block"
    d.mkdir()
    (d / "sitecustomize.py").write_text(
        "import sys\nfrom importlib.machinery import PathFinder\n"
        f"BLOCK = {set(ABSENT_ON_GPU_MACHINE)!r}\n"
        "class _F(PathFinder):\n    @classmethod\n    def find_spec(cls, name, path=None, target=None):\n"
        "        return None if name.split('.')[0] in BLOCK else PathFinder.find_spec(name, path, target)\n"
        "sys.meta_path[:] = [_F if f is PathFinder else f for f in sys.meta_path]\n")
    return str(d)


def _run(tmp_path, *args, timeout=900):
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_blocker(tmp_path), str(ROOT)]), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_budget_too_small_skips_phases_and_still_reports(tmp_path):
    out = tmp_path / "rep"
    res = _run(tmp_path, "--out", str(out), "--budget-s", "1", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["phases"]["env"]["status"] == "ok"
    assert rep["phases"]["nccl"]["status"] == "skipped: budget"
    assert rep["phases"]["prepare"]["status"] == "skipped: budget"
    assert "skipped: budget" in (out / "gpu_check.md").read_text()


@pytest.mark.slow
def test_dry_run_touches_every_phase(tmp_path):
    out, work = tmp_path / "rep", tmp_path / "work"
    res = _run(tmp_path, "--out", str(out), "--work", str(work), "--budget-s", "1500", timeout=1800)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-2000:])
    assert res.stdout.strip().splitlines()[-1].startswith("gpu check (dry-run (CPU)): all phases that ran passed")
    rep = json.loads((out / "gpu_check.json").read_text())
    assert not rep["unavailable"]
    ph = rep["phases"]
    assert all(ph[p]["status"] == "ok" for p in ("env", "nccl", "prepare", "launch", "stages")), ph
    # the planner simulates the real backbones' cold start; these CPU jobs are refused with its reason
    assert set(ph["plan"]["status"].split(", ")) <= {"ok", "planner not available", "not plannable"}, ph["plan"]
    assert all(r["plan"]["detail"] for r in rep["stages"] if r.get("plan", {}).get("status") == "not plannable")
    assert rep["env"]["peak_tflops"] > 0 and rep["env"]["api"]["import diffusers"] is True
    assert rep["nccl"]["backend"] == "gloo" and rep["nccl"]["world"] == 2 and rep["nccl"]["sum_correct"] is True
    assert [(r["name"], r["status"]) for r in rep["launch"]] == [
        ("launch/cold_start", "ok"), ("launch/rl", "ok"), ("launch/cold_start_ddp", "ok")]
    assert (work / "launch" / "rl" / "artifact" / "manifest.json").is_file()
    by = {r["job"]: r for r in rep["stages"]}
    for job in ("tiny_flux2/cold_start", "tiny_flux2/rl", "mid/fp32_masters/cold_start", "mid/fp32_masters/rl"):
        r = by[job]
        assert r["status"] == "ok", r
        assert r["flops_per_step"] > 0 and r["step_median_s"] > 0 and r["mfu"] > 0, r
        assert r["steps"] == 3 and r["world"] == 1
    for job in ("mid/bf16_masters/cold_start", "mid/bf16_masters/rl"):
        assert by[job]["status"] == "ok", by[job]
    # the mid-size model carries the real FLUX.2-klein 4B LoRA target list (20 single blocks)
    from safetensors import safe_open

    gen = next((work / "runs" / "mid" / "fp32_masters" / "rl" / "artifact" / "generator").glob("*.safetensors"))
    with safe_open(str(gen), "pt") as f:
        keys = list(f.keys())
    assert any("single_transformer_blocks.19.attn.to_out" in k for k in keys)
    assert any("transformer_blocks.0.attn.add_q_proj" in k for k in keys)
    md = (out / "gpu_check.md").read_text()
    for heading in ("## 1. Environment", "## 2. Process group", "## 3–4. Stages", "## 5. Stage commands"):
        assert heading in md
