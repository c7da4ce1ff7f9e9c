"""Locate, read, override and type-check ``params/<backbone>.yaml``."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from rtdmd.config.schema import Params
from rtdmd.config.typed import ConfigError, apply_overrides, from_mapping, load_yaml, to_mapping

BACKBONES = (
    "flux2_4b", "flux2_9b", "sd35m", "sd3m", "flux1_dev",
    "tiny_flux2", "tiny_sd3", "tiny_flux1", "toy2d", "digits",
)


def params_dir() -> Path:
    """``$RTDMD_PARAMS_DIR`` or the repo's ``params/`` next to the package."""
    env = os.environ.get("RTDMD_PARAMS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "params"


def params_path(name_or_path: str | os.PathLike) -> Path:
    """A backbone name resolves to ``params/<name>.yaml``; a path is taken as is."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        return Path(text)
    if text not in BACKBONES:
        raise ConfigError(f"unknown backbone '{text}'; valid backbones: {', '.join(BACKBONES)}")
    return params_dir() / f"{text}.yaml"


def load_params(name_or_path: str | os.PathLike, overrides: Iterable[str] = ()) -> Params:
    """Load and validate a params file, applying dotted ``key=value`` overrides first."""
    path = params_path(name_or_path)
    raw = load_yaml(path)
    apply_overrides(raw, list(overrides), source=f"{path} (override)")
    params = from_mapping(Params, raw, source=str(path))
    return params


def params_hash(params: Params) -> str:
    """Stable sha256 of the resolved params (used to refuse resuming under a changed config)."""
    blob = json.dumps(to_mapping(params), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()
