"""LoRA files: diffusers-layout safetensors + ``adapter_config.json``; reference ``.pt`` import.

On disk (one directory per adapter, so ``pipe.load_lora_weights(dir)`` finds it):

* ``pytorch_lora_weights.safetensors`` — keys ``transformer.<module>.lora_A.weight`` /
  ``…lora_B.weight`` (the diffusers/PEFT layout), fp32;
* ``adapter_config.json`` — ``r, lora_alpha, target_modules, lora_dropout=0, bias="none",
  peft_type="LORA", init_lora_weights, use_rslora=false`` (spec §9.2).

Reference checkpoints (``generator_ema.pt`` / ``fake_score_net.pt``) are torch-saved dicts of
``<module>.lora_A.default.weight`` tensors; they are read with ``torch.load(weights_only=True)``
only, so a file holding any other pickled object is refused without executing it.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from rtdmd.artifacts.fs import save_safetensors
from rtdmd.lora.core import LoraError, canonical_key, pairs, state_rank

WEIGHTS = "pytorch_lora_weights.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "transformer."


def adapter_config(rank: int, alpha: float, targets: list[str], init: str = "gaussian") -> dict:
    return {
        "r": int(rank), "lora_alpha": float(alpha), "target_modules": list(targets), "lora_dropout": 0.0,
        "bias": "none", "peft_type": "LORA", "task_type": None, "init_lora_weights": init, "use_rslora": False,
    }


def save_lora_dir(directory: str | Path, state: dict[str, torch.Tensor], *, rank: int, alpha: float,
                  targets: list[str], init: str = "gaussian") -> Path:
    """Write weights + config into ``directory`` (caller publishes the directory atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    canon = {canonical_key(k): v for k, v in state.items()}
    if state_rank(canon) != rank:
        raise LoraError(f"state has rank {state_rank(canon)} but rank={rank} was given")
    config = adapter_config(rank, alpha, targets, init)
    tensors = {PREFIX + k: v.detach().float().cpu().contiguous() for k, v in sorted(canon.items())}
    # diffusers reads rank/alpha for `pipe.load_lora_weights(dir)` from this metadata key,
    # with every field prefixed by the component name.
    diffusers_meta = {f"transformer.{k}": v for k, v in config.items() if v is not None}
    save_safetensors(tensors, directory / WEIGHTS, metadata={
        "format": "pt", "lora_adapter_metadata": json.dumps(diffusers_meta, sort_keys=True),
    })
    (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, allow_nan=False))
    return directory


def load_lora_dir(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and validate an adapter directory -> (canonical state, adapter config)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    wpath, cpath = directory / WEIGHTS, directory / CONFIG
    for path in (wpath, cpath):
        if not path.is_file():
            raise LoraError(f"LoRA file {path} is missing")
    try:
        config = json.loads(cpath.read_text())
    except json.JSONDecodeError as exc:
        raise LoraError(f"{cpath} is not valid JSON ({exc})") from None
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise LoraError(f"{cpath} lacks '{key}'")
    try:
        raw = load_file(str(wpath))
    except Exception as exc:  # SafetensorError on truncated / corrupt files
        raise LoraError(f"{wpath} is not a readable safetensors file ({exc}); it may be truncated") from None
    state = {}
    for key, value in raw.items():
        try:
            state[canonical_key(key)] = value
        except LoraError:
            raise LoraError(f"{wpath}: unknown key '{key}' (only lora_A/lora_B weights are allowed)") from None
    if not state:
        raise LoraError(f"{wpath} holds no tensors")
    pairs(state)
    rank = state_rank(state)
    if rank != int(config["r"]):
        raise LoraError(f"{wpath}: tensors have rank {rank} but {cpath} says r={config['r']}")
    return state, config


def read_reference_pt(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a reference LoRA ``.pt`` safely (tensors only) into a canonical state dict."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path} does not exist")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise LoraError(
            f"{path} refused: it contains pickled objects other than tensors (nothing was executed): {str(exc).splitlines()[0]}"
        ) from None
    except Exception as exc:
        raise LoraError(f"{path} is not a readable torch checkpoint ({exc})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise LoraError(f"{path} refused: expected a dict of name -> tensor")
    not_lora = [k for k in obj if "lora_A" not in k and "lora_B" not in k]
    if not_lora:
        raise LoraError(f"{path} is not LoRA-only: e.g. key '{not_lora[0]}' (full weights belong in model.pretrained)")
    state = {canonical_key(k): v for k, v in obj.items()}
    pairs(state)
    return state
