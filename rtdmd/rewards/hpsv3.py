"""HPSv3 (rewards.md §1.3) through the ``hpsv3`` package (optional extra).

The package (PyPI ``hpsv3==1.0.0``, install with ``--no-deps``) wraps a
Qwen2-VL-7B reward model whose head outputs ``[B,2]`` = (μ, σ); the score is
μ (column 0), ≈10–16 with the real weights.

Before importing the package three compatibility patches are applied for
transformers 5 (see :func:`apply_transformers_patches`): the
``transformers.image_utils.VideoInput`` alias, ``Qwen2VLModel.embed_tokens``
and a ``safetensors.torch.load_file`` wrapper renaming checkpoint keys
(``visual.*`` → ``model.visual.*``; ``model.*`` → ``model.language_model.*``).

Config/checkpoint resolution: ``RTDMD_HPSV3_CONFIG_PATH`` /
``RTDMD_HPSV3_CHECKPOINT_PATH`` first, else the first of the names below in
``<ckpt>/hpsv3``, ``<ckpt>/HPSv3``, ``<ckpt>``; else (hub allowed) the package
defaults (bundled ``HPSv3_7B.yaml`` + hub ``MizzenAI/HPSv3``); else a
:class:`MissingCheckpointError`.

The scoring glue (:class:`HPSv3Scorer`) works with any *inferencer* object
exposing ``reward(images, prompts) -> [B,2]`` (tested with a stub; no tiny
HPSv3 checkpoint exists because the reward head lives in the optional package).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from .base import RewardScorer
from .ckpt import find_first, hub_allowed, missing, resolve_ckpt_root
from .errors import MissingBackendError

CONFIG_NAMES = ["config.yaml", "config.yml", "hpsv3.yaml", "inferencer_config.yaml", "HPSv3_7B.yaml"]
CHECKPOINT_NAMES = ["HPSv3.safetensors", "HPS_v3.1_compressed.pt", "HPS_v3_compressed.pt", "HPSv3.pt", "hpsv3.pt",
                    "checkpoint.pt", "checkpoint.pth", "model.pt", "model.pth", "model.safetensors",
                    "pytorch_model.bin"]
SUBDIRS = ("hpsv3", "HPSv3", "")


def resolve_paths(root: Path | None) -> tuple[Path | None, Path | None]:
    """(config, checkpoint) following the reference order; ``None`` where nothing was found."""
    cfg = os.environ.get("RTDMD_HPSV3_CONFIG_PATH")
    ckpt = os.environ.get("RTDMD_HPSV3_CHECKPOINT_PATH")
    dirs = [root / s if s else root for s in SUBDIRS] if root is not None else []
    cfg_p = Path(cfg) if cfg else find_first(dirs, CONFIG_NAMES)
    ckpt_p = Path(ckpt) if ckpt else find_first(dirs, CHECKPOINT_NAMES)
    return cfg_p, ckpt_p


def mu_column(out: Any) -> torch.Tensor:
    """μ = column 0 of the ``[B,2]`` (μ, σ) output (a ``[B]`` output is taken as μ)."""
    t = torch.as_tensor(out if not isinstance(out, (list, tuple)) else
                        [torch.as_tensor(o).reshape(-1).tolist() for o in out]).float()
    if t.ndim == 1:
        return t
    return t[:, 0]


def _rename_key(k: str) -> str:
    if k.startswith("visual."):
        return "model." + k
    if k.startswith("model.") and not k.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + k[len("model."):]
    return k


_RENAME_ACTIVE = threading.local()


def apply_transformers_patches() -> None:
    """The three patches the reference applies before importing ``hpsv3`` (idempotent).

    Unlike the reference, the ``safetensors.torch.load_file`` wrapper only renames
    keys inside :func:`renaming_safetensors_keys` (the HPSv3 build), so other
    safetensors loads in the process are untouched.
    """
    import safetensors.torch as st
    import transformers.image_utils as iu

    if not hasattr(iu, "VideoInput"):
        try:
            from transformers.video_utils import VideoInput  # transformers >= 4.52
        except ImportError:  # pragma: no cover
            VideoInput = Any  # type: ignore
        iu.VideoInput = VideoInput
    try:
        from transformers import Qwen2VLModel

        if not hasattr(Qwen2VLModel, "embed_tokens"):
            Qwen2VLModel.embed_tokens = property(lambda self: self.get_input_embeddings())
    except ImportError:  # pragma: no cover
        pass
    if not getattr(st.load_file, "_rtdmd_renaming", False):
        orig = st.load_file

        def load_file(filename, device="cpu"):
            sd = orig(filename, device=device)
            if getattr(_RENAME_ACTIVE, "on", False):
                sd = {_rename_key(k): v for k, v in sd.items()}
            return sd

        load_file._rtdmd_renaming = True  # type: ignore[attr-defined]
        st.load_file = load_file


@contextlib.contextmanager
def renaming_safetensors_keys():
    prev = getattr(_RENAME_ACTIVE, "on", False)
    _RENAME_ACTIVE.on = True
    try:
        yield
    finally:
        _RENAME_ACTIVE.on = prev


class HPSv3Scorer(RewardScorer):
    name = "hpsv3"
    differentiable = False

    def __init__(self, inferencer: Any, device="cpu", backend="hpsv3"):
        super().__init__(device, backend)
        self.inferencer = inferencer

    def modules(self):
        m = getattr(self.inferencer, "model", None)
        return [m] if isinstance(m, torch.nn.Module) else []

    def _score(self, batch, prompts, metadata):
        images = batch.pil()
        try:
            out = self.inferencer.reward(images, prompts)
        except Exception:
            # the reference retries with temporary PNG paths
            with tempfile.TemporaryDirectory(prefix="rtdmd_hpsv3_") as d:
                paths = []
                for i, im in enumerate(images):
                    p = os.path.join(d, f"{i:05d}.png")
                    im.save(p)
                    paths.append(p)
                out = self.inferencer.reward(paths, prompts)
        return mu_column(out)


def build(ckpt_dir=None, device="cpu", backend=None) -> HPSv3Scorer:
    root = resolve_ckpt_root(ckpt_dir)
    cfg, ckpt = resolve_paths(root)
    if ckpt is None and not hub_allowed(ckpt_dir):
        where = (root / "hpsv3" / CHECKPOINT_NAMES[0]) if root is not None else None
        raise missing("hpsv3", f"HPSv3 checkpoint ({CHECKPOINT_NAMES[0]} + Qwen2-VL-7B config)", where,
                      hub_id="MizzenAI/HPSv3")
    msg = ("reward 'hpsv3' needs the hpsv3 package: pip install hpsv3==1.0.0 --no-deps "
           "(plus its runtime deps; it is not part of the default install)")
    if importlib.util.find_spec("hpsv3") is None:
        raise MissingBackendError(msg)
    apply_transformers_patches()
    with renaming_safetensors_keys():
        try:
            from hpsv3 import HPSv3RewardInferencer
        except ImportError as e:
            raise MissingBackendError(msg) from e
        try:
            inf = HPSv3RewardInferencer(config_path=str(cfg) if cfg else None,
                                        checkpoint_path=str(ckpt) if ckpt else None,
                                        device=str(device), differentiable=False)
        except Exception:
            if not hub_allowed(ckpt_dir):
                raise
            inf = HPSv3RewardInferencer(device=str(device), differentiable=False)  # package defaults
    return HPSv3Scorer(inf, device=device)
