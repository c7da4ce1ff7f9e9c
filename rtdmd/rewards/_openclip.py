"""open_clip model construction from a local weights file (+ optional custom architecture JSON).

Custom architectures (used by the tiny test checkpoints) are described by a JSON
file next to the weights::

    {"model_name": "rtdmd-tiny-vit", "model_cfg": {"embed_dim": 16, "vision_cfg": {...}, "text_cfg": {...}}}

``model_cfg`` is an open_clip model config (the same schema as the JSON files
shipped in ``open_clip/model_configs``). It is registered with open_clip under
``model_name`` and built with ``open_clip.create_model``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .ckpt import load_state_dict_strict, load_torch_state_dict, read_json, wrap_load_errors
from .errors import MissingBackendError


def import_open_clip():
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - open_clip is a default dependency
        raise MissingBackendError("open_clip is not installed: pip install 'rtdmd[rewards]' "
                                  "(open_clip_torch==3.3.0)") from e
    return open_clip


def register_arch(config_path: Path, scorer: str) -> str:
    """Register the custom architecture described by ``config_path``; returns its name."""
    import_open_clip()
    cfg = read_json(config_path, scorer)
    name, model_cfg = cfg.get("model_name"), cfg.get("model_cfg")
    if not name or not isinstance(model_cfg, dict):
        from .errors import CorruptCheckpointError

        raise CorruptCheckpointError(f"{scorer}: '{config_path}' needs keys 'model_name' and 'model_cfg'")
    from open_clip import factory

    registry = getattr(factory, "_MODEL_CONFIGS", None)
    if isinstance(registry, dict):
        registry[name] = model_cfg  # the registry open_clip.create_model reads
    else:  # pragma: no cover - other open_clip versions: the public file-based API
        import tempfile

        d = Path(tempfile.mkdtemp(prefix="rtdmd_open_clip_cfg_"))
        (d / f"{name}.json").write_text(json.dumps(model_cfg))
        import open_clip

        open_clip.add_model_config(d)
    return name


class _DropRandomInitWarning(logging.Filter):
    """open_clip logs "No pretrained weights loaded" for pretrained=None; our weights are loaded right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


def create_model(arch: str, scorer: str, *, force_quick_gelu: bool = False) -> torch.nn.Module:
    open_clip = import_open_clip()
    flt = _DropRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        model = wrap_load_errors(scorer, arch, lambda: open_clip.create_model(
            arch, pretrained=None, precision="fp32", device="cpu", force_quick_gelu=force_quick_gelu))
    finally:
        root.removeFilter(flt)
    return model


def load_weights(model: torch.nn.Module, path: Path, scorer: str, key: str | None = None) -> None:
    sd = load_torch_state_dict(path, scorer, key=key)
    load_state_dict_strict(model, sd, path, scorer, ignore=("position_ids", "attn_mask"))


def tokenizer_for(arch: str):
    open_clip = import_open_clip()
    return open_clip.get_tokenizer(arch)
