"""Shared helpers of the reliability suite: tiny toy2d runs, reference LoRA files, CLI calls."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

import rtdmd

ROOT = Path(__file__).resolve().parents[2]
CODE = Path(rtdmd.__file__).resolve().parents[1]  # the rtdmd under test (child processes import the same)
VENV_BIN = Path(sys.executable).parent
# toy2d cold start: 8 samples a step, a checkpoint every 2 steps, no evaluation — seconds on CPU
FAST = ["distributed.strategy=none", "cold_start.global_batch_size=8", "cold_start.total_steps=4",
        "cold_start.eval_interval=0", "cold_start.checkpoint.save_interval=2", "cold_start.log_interval=1"]
TOY2D_MODULES = {"in_proj": (50, 128), "hidden.0": (128, 128), "hidden.1": (128, 128), "out_proj": (128, 2)}


def train(capsys, out: Path, *extra: str, overrides=FAST) -> tuple[int, str]:
    """``python -m rtdmd.train cold_start --config toy2d`` in-process; returns (exit status, stderr)."""
    from rtdmd.train.__main__ import main

    capsys.readouterr()
    rc = main(["cold_start", "--config", "toy2d", *overrides, "--out", str(out), *extra])
    return rc, capsys.readouterr().err


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``rtdmd ...`` in-process; returns (exit status, stdout, stderr)."""
    from rtdmd.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def reference_pt(path: Path, modules=None, rank=4, seed=0, fill=None) -> dict:
    """A reference-layout LoRA ``.pt`` (``<module>.lora_A.default.weight``) for toy2d."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (fin, fout) in (modules or TOY2D_MODULES).items():
        state[f"{name}.lora_A.default.weight"] = torch.randn(rank, fin, generator=g) * 0.1
        state[f"{name}.lora_B.default.weight"] = torch.randn(fout, rank, generator=g) * 0.1
    if fill is not None:
        state["in_proj.lora_B.default.weight"][0, 0] = fill
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def trained_like_artifact(out: Path) -> Path:
    """A published cold-start-like artifact (generator + fake_score) without training."""
    from rtdmd.lora.artifact import Adapter, publish_lora_artifact

    def state(seed):
        g = torch.Generator().manual_seed(seed)
        return {f"{m}.lora_{ab}.weight": torch.randn(*(4, fin) if ab == "A" else (fout, 4), generator=g)
                for m, (fin, fout) in TOY2D_MODULES.items() for ab in "AB"}

    targets = list(TOY2D_MODULES)
    publish_lora_artifact(str(out), {"generator": Adapter(state(0), 4, 8.0, targets),
                                     "fake_score": Adapter(state(1), 4, 8.0, targets)},
                          {"stage": "cold_start", "backbone": "toy2d", "parent": None})
    return out


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes): 'nothing was lost' comparisons."""
    root = Path(root)
    if root.is_file():
        return {"": root.read_bytes()}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(CODE),
                "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(out: Path, *overrides: str, nproc: int = 0, extra=()) -> list[str]:
    base = ["-m", "rtdmd.train", "cold_start", "--config", "toy2d", *overrides, "--out", str(out), *extra]
    if nproc:
        return [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), *base]
    return [sys.executable, *base]


def wait_for(pred, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.05) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(pred())
        time.sleep(poll)
    return False


def hold_lock_process(target: Path) -> subprocess.Popen:
    """A real process that takes the output lock of ``target`` and sleeps until killed."""
    code = ("import sys, time\nfrom rtdmd.artifacts.lock import OutputLock\n"
            f"OutputLock({str(target)!r}, command='holder').acquire()\nprint('held', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc
