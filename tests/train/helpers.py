"""Shared helpers for the trainer tests: params, in-process trainers, CLI runs."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

TINY = ("tiny_flux2", "tiny_sd3", "tiny_flux1")


def tiny_overrides(name: str, prompts: Path) -> list[str]:
    """Batch 2, 32 px, a tiny prompt file (bf16 settings fall back to fp32 on CPU)."""
    return [f"cold_start.prompts={prompts}", "cold_start.global_batch_size=2", "model.resolution=32"]


def write_prompts(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("a red cat on a table\na blue car at night\na small tree in the snow\na golden clock\n")
    return path


def make_trainer(name: str, out: Path, overrides=(), cls=None):
    from rtdmd.config import load_params
    from rtdmd.train.base import RunOptions
    from rtdmd.train.cold_start import ColdStartTrainer
    from rtdmd.train.logging import NullLogger

    params = load_params(name, ["distributed.strategy=none", *overrides])
    return (cls or ColdStartTrainer)(params, RunOptions(out=str(out)), logger=NullLogger())


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", "PYTHONPATH": str(ROOT)})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(config: str, out: Path, *overrides: str, nproc: int = 0) -> list[str]:
    base = ["-m", "rtdmd.train", "cold_start", "--config", config, *overrides, "--out", str(out)]
    if nproc:
        return [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), *base]
    return [sys.executable, *base]


def run(cmd, timeout=600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=child_env(**env), capture_output=True, text=True, timeout=timeout)


