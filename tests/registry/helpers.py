"""Helpers of the registry tests: toy2d LoRA stacks, evaluation records, an MLflow store per test."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
ARTIFACT_DIR = ROOT / "test-artifacts" / "registry"


def make_stack(params, out: Path, seed: int, scale: float = 0.3) -> tuple[Path, Path]:
    """A cold-start artifact and an RL artifact stacked on it (random LoRA weights, fixed seed)."""
    from rtdmd.backbones import build_backbone
    from rtdmd.lora import inject_lora, lora_state_dict
    from rtdmd.lora.artifact import Adapter, publish_lora_artifact

    net = build_backbone(params).load_transformer("generator")
    inject_lora(net, params.lora.targets, params.lora.rank, params.lora.alpha)
    g = torch.Generator().manual_seed(seed)
    parent, paths = None, []
    s = params.sampler
    for stage in ("cold_start", "rl"):
        with torch.no_grad():
            for n, p in net.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
        uri = out / stage / "artifact"
        publish_lora_artifact(str(uri), {"generator": Adapter(lora_state_dict(net), params.lora.rank, params.lora.alpha,
                                                              list(params.lora.targets))},
                              {"stage": stage, "backbone": params.name, "parent": parent,
                               "base_model": {"id": params.model.pretrained, "revision": params.model.revision},
                               "sampler": {"nfe": len(s.step_list), "step_list": list(s.step_list), "eta": s.eta,
                                           "guidance": s.guidance}})
        parent = {"uri": str(uri), "manifest_sha256": hashlib.sha256((uri / "manifest.json").read_bytes()).hexdigest()}
        paths.append(uri)
    return paths[0], paths[1]


def evaluation(target: float, region: float, cold_target: float, cold_region: float, *, held_out=None,
               cold_held_out=None) -> dict:
    """An evaluation record as the flow would produce it (toy2d rewards + optional held-out ones)."""
    cand = {"toy2d_target": target, "toy2d_region": region, **(held_out or {})}
    cold = {"toy2d_target": cold_target, "toy2d_region": cold_region, **(cold_held_out or {})}
    return {"candidate": {"variant": "rtdmd-4", "scores": cand}, "cold_start": {"variant": "cold_start-4", "scores": cold},
            "training_rewards": ["toy2d_target", "toy2d_region"], "held_out_rewards": sorted(held_out or {})}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rtdmd_cli(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """``rtdmd <args>`` as a user runs it (the console script of the venv)."""
    exe = VENV_BIN / "rtdmd"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "rtdmd.cli"]
    return subprocess.run([*cmd, *args], cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=timeout)


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RTDMD_", "METAFLOW_"))}
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"})
    env.update(extra)
    return env


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            opener.open(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def copy_store(template: Path, dest: Path) -> str:
    """A fresh MLflow sqlite store (copied from an empty template: no schema migration per test)."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, dest / "mlflow.db")
    return f"sqlite:///{dest / 'mlflow.db'}"
