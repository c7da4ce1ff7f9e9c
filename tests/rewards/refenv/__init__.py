"""The isolated reference-package environment of the reward equivalence tests (see build.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .build import ensure_refenv

RUNNER = Path(__file__).with_name("run_reference.py")
__all__ = ["ensure_refenv", "run_reference"]


def run_reference(scorer: str, ckpt: Path, work: Path, prompts: list[str], tensors: dict[str, torch.Tensor],
                  timeout: float = 1800) -> tuple[dict[str, torch.Tensor], dict]:
    """Score ``tensors``/``prompts`` with the reference package of ``scorer`` in the isolated env."""
    py = ensure_refenv()
    work.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(work / "inputs.safetensors"))
    (work / "inputs.json").write_text(json.dumps({"prompts": prompts}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    r = subprocess.run([str(py), str(RUNNER), scorer, str(ckpt), str(work)], cwd=work, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"reference {scorer} run failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n"
                           f"{r.stderr[-6000:]}")
    return load_file(str(work / "reference.safetensors")), json.loads((work / "reference.json").read_text())
