"""Reward checkpoint directory: resolution, on-disk layout, safe loading.

Resolution happens when a scorer is **built** (not at import time, unlike the
reference, rewards.md §0 QUIRK):

1. the explicit ``ckpt_dir`` argument;
2. the environment variable ``RTDMD_REWARD_CKPT_PATH``;
3. otherwise no local root. A scorer whose weights have a public hub id then
   loads from the hub **only** when ``RTDMD_REWARD_ALLOW_HUB=1`` (or
   ``ckpt_dir="hub"``); in every other case it raises
   :class:`MissingCheckpointError` naming the file and where to put it.

On-disk layout under the root (what the real loaders read and what
:func:`rtdmd.rewards.tiny.build_tiny_reward_checkpoints` writes)::

    <root>/PickScore_v1/                        HF CLIPModel (save_pretrained)      pickscore
    <root>/CLIP-ViT-H-14-laion2B-s32B-b79K/     HF CLIPProcessor                    pickscore
    <root>/clip-vit-large-patch14/              HF CLIPModel + CLIPProcessor        clipscore, aesthetic
    <root>/sac+logos+ava1-l14-linearMSE.pth     plain state_dict (layers.N.*)       aesthetic
    <root>/open_clip_pytorch_model.bin          open_clip ViT-H-14 state_dict       hpsv2
    <root>/HPS_v2.1_compressed.pt               {"state_dict": ...}                 hpsv2
    <root>/hpsv2_open_clip_config.json          optional: custom open_clip arch     hpsv2 (tiny)
    <root>/hpsv3/ (or HPSv3/)                   HPSv3.safetensors + Qwen2-VL-7B-Instruct config.json,
                                                tokenizer/processor files (native); config yaml (package)   hpsv3
    <root>/ImageReward/ImageReward.pt, med_config.json, bert-base-uncased/ (tokenizer)  imagereward
    <root>/geneval/mask2former/                 HF Mask2Former + image processor    geneval (default detector)
    <root>/geneval/colour_clip/                 open_clip_pytorch_model.bin (+ open_clip_config.json)  geneval colour head
    <root>/geneval2/Qwen3-VL-8B-Instruct/       HF Qwen3-VL (save_pretrained)       geneval2
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import CorruptCheckpointError, MissingCheckpointError

__all__ = [
    "CKPT_ENV",
    "ALLOW_HUB_ENV",
    "HUB",
    "resolve_ckpt_root",
    "hub_allowed",
    "require_path",
    "find_first",
    "load_torch_state_dict",
    "wrap_load_errors",
]

CKPT_ENV = "RTDMD_REWARD_CKPT_PATH"
ALLOW_HUB_ENV = "RTDMD_REWARD_ALLOW_HUB"
#: Sentinel value for ``ckpt_dir`` meaning "load from hub ids".
HUB = "hub"

_HINT = (
    "Put it under the reward checkpoint directory (pass ckpt_dir=..., or set "
    f"{CKPT_ENV}=/path/to/reward_ckpts; layout in rtdmd/rewards/ckpt.py), "
    "or build tiny random-weight test checkpoints with "
    "rtdmd.rewards.tiny.build_tiny_reward_checkpoints(dir)."
)


def hub_allowed(ckpt_dir: Any = None) -> bool:
    if ckpt_dir is not None and str(ckpt_dir) == HUB:
        return True
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    return os.environ.get(ALLOW_HUB_ENV, "").lower() in ("1", "true", "yes")


def resolve_ckpt_root(ckpt_dir: str | os.PathLike | None = None) -> Path | None:
    """Explicit argument > ``RTDMD_REWARD_CKPT_PATH`` > ``None`` (resolved now, not at import)."""
    if ckpt_dir is not None and str(ckpt_dir) != HUB:
        return Path(ckpt_dir).expanduser()
    if ckpt_dir is None:
        env = os.environ.get(CKPT_ENV)
        if env:
            return Path(env).expanduser()
    return None


def missing(scorer: str, what: str, path: Path | str | None, *, hub_id: str | None = None) -> MissingCheckpointError:
    where = f"'{path}'" if path is not None else "(no checkpoint directory: ckpt_dir and $" + CKPT_ENV + " are unset)"
    msg = f"{scorer}: missing checkpoint {what} {where}. {_HINT}"
    if hub_id:
        msg += f" With network access, RTDMD_REWARD_ALLOW_HUB=1 loads '{hub_id}' from the hub instead."
    return MissingCheckpointError(msg)


def require_path(root: Path | None, rel: str, scorer: str, what: str = "", *, is_dir: bool | None = None,
                 hub_id: str | None = None) -> Path:
    """``root/rel`` if it exists, else one clear :class:`MissingCheckpointError`."""
    label = f"{what} '{rel}'" if what else f"'{rel}'"
    if root is None:
        raise missing(scorer, label, None, hub_id=hub_id)
    p = root / rel
    ok = p.is_dir() if is_dir else p.is_file() if is_dir is False else p.exists()
    if not ok:
        raise missing(scorer, label, p, hub_id=hub_id)
    return p


def require_all(root: Path | None, items: list[tuple[str, str]], scorer: str, *,
                hub_id: str | None = None) -> list[Path]:
    """Like :func:`require_path` for several files: one error listing every missing one."""
    if root is None:
        raise missing(scorer, " + ".join(f"{w} '{r}'" for r, w in items), None, hub_id=hub_id)
    paths = [root / r for r, _ in items]
    absent = [(p, w) for p, (_, w) in zip(paths, items) if not p.is_file()]
    if absent:
        raise missing(scorer, " and ".join(f"{w} '{p.name}'" for p, w in absent),
                      ", ".join(str(p) for p, _ in absent), hub_id=hub_id)
    return paths


def find_first(dirs: list[Path], names: list[str]) -> Path | None:
    for d in dirs:
        for n in names:
            p = d / n
            if p.is_file():
                return p
    return None


def load_torch_state_dict(path: Path, scorer: str, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` (never unpickles code) with a clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise missing(scorer, "file", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code objects, ...
        raise CorruptCheckpointError(
            f"{scorer}: cannot read checkpoint file '{path}' ({type(e).__name__}: {str(e)[:300]}). "
            "The file is truncated/corrupt or not a plain tensor state_dict (only "
            "torch.load(weights_only=True) is used); re-download or rebuild it.") from e
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
            raise CorruptCheckpointError(f"{scorer}: checkpoint file '{path}' has no key '{key}' (found {keys})")
        obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CorruptCheckpointError(f"{scorer}: checkpoint file '{path}' is not a state_dict of tensors")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_state_dict_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path, scorer: str,
                           ignore: tuple[str, ...] = ("position_ids",)) -> None:
    """``load_state_dict`` that reports missing/unexpected/mis-shaped keys naming the file."""
    own = module.state_dict()
    bad_shape = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad_shape:
        k = bad_shape[0]
        raise CorruptCheckpointError(
            f"{scorer}: checkpoint '{path}' does not fit the model: '{k}' has shape {tuple(sd[k].shape)}, "
            f"model expects {tuple(own[k].shape)} ({len(bad_shape)} mismatched tensors)")
    res = module.load_state_dict(sd, strict=False)
    miss = [k for k in res.missing_keys if not k.endswith(ignore)]
    unexp = [k for k in res.unexpected_keys if not k.endswith(ignore)]
    if miss or unexp:
        raise CorruptCheckpointError(
            f"{scorer}: checkpoint '{path}' does not fit the model: missing keys {miss[:5]}"
            f"{'...' if len(miss) > 5 else ''}, unexpected keys {unexp[:5]}{'...' if len(unexp) > 5 else ''}")


def wrap_load_errors(scorer: str, path: Path | str, fn: Callable[[], Any]) -> Any:
    """Run a ``from_pretrained``-style loader; turn any failure into an error naming the directory/file."""
    try:
        return fn()
    except (MissingCheckpointError, CorruptCheckpointError):
        raise
    except Exception as e:
        p = Path(path)
        detail = ""
        if p.is_dir():
            files = sorted(x.name for x in p.iterdir())
            detail = f" Files there: {files[:12]}."
        raise CorruptCheckpointError(
            f"{scorer}: cannot load checkpoint from '{path}' ({type(e).__name__}: {str(e)[:400]}).{detail} "
            "A truncated/corrupt weight file or an incomplete save_pretrained directory causes this.") from e


def read_json(path: Path, scorer: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except Exception as e:
        raise CorruptCheckpointError(f"{scorer}: cannot parse JSON file '{path}' ({e})") from e


def hf_source(root: Path | None, rel: str, hub_id: str, scorer: str, ckpt_dir: Any, what: str) -> str:
    """Local ``root/rel`` directory if present, else the hub id when allowed, else a clear error."""
    if root is not None:
        p = root / rel
        if p.is_dir():
            if not (p / "config.json").is_file() and not (p / "preprocessor_config.json").is_file() \
                    and not (p / "tokenizer_config.json").is_file():
                raise MissingCheckpointError(
                    f"{scorer}: checkpoint directory '{p}' has no config.json/preprocessor_config.json "
                    f"(expected a save_pretrained directory of {what} '{hub_id}'). {_HINT}")
            return str(p)
        if not hub_allowed(ckpt_dir):
            raise missing(scorer, f"{what} directory '{rel}/'", p, hub_id=hub_id)
    elif not hub_allowed(ckpt_dir):
        raise missing(scorer, f"{what} directory '{rel}/'", None, hub_id=hub_id)
    return hub_id
