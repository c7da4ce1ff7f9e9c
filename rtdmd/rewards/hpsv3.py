"""HPSv3 (rewards.md §1.3): a native backend (default) and the ``hpsv3`` package (optional extra).

Backend ``"native"`` (default, :mod:`rtdmd.rewards._hpsv3_native`): transformers'
``Qwen2VLModel`` + the HPSv3 reward head, loading ``HPSv3.safetensors`` with the key renames
below and a strict key check. Checkpoint layout (``hpsv3/`` may also be ``HPSv3/`` or the root;
the env vars below still apply)::

    <ckpt>/hpsv3/HPSv3.safetensors        MizzenAI/HPSv3 weights (published key layout)
    <ckpt>/hpsv3/config.json + processor  Qwen/Qwen2-VL-7B-Instruct files: config.json,
                                          tokenizer (vocab.json, merges.txt / tokenizer.json,
                                          tokenizer_config.json), preprocessor_config.json,
                                          chat_template(.json|.jinja)
                                          (or in a subdirectory ``Qwen2-VL-7B-Instruct/`` next to
                                          the weights)

The score is μ, column 0 of the ``[B,2]`` (μ, σ) head output. The VLM runs in the checkpoint's
dtype (bfloat16 for the published file; ``scorer.to(dtype=...)`` changes it), the head in float32.
With the hub allowed and no local weights, ``MizzenAI/HPSv3`` + ``Qwen/Qwen2-VL-7B-Instruct`` are
fetched instead (untested offline).

Backend ``"hpsv3"``: the package (PyPI ``hpsv3==1.0.0``, install with ``--no-deps``) wraps a
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
exposing ``reward(images, prompts) -> [B,2]``: :class:`NativeInferencer` or the package's.
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

from ._hpsv3_native import rename_key
from .base import RewardScorer
from .ckpt import find_first, hub_allowed, load_state_dict_strict, load_torch_state_dict, missing, \
    resolve_ckpt_root, wrap_load_errors
from .errors import CorruptCheckpointError, MissingBackendError

BACKENDS = ("native", "hpsv3")
#: Optional subdirectory (next to the weights) holding the Qwen2-VL base config/processor files.
BASE_SUBDIR = "Qwen2-VL-7B-Instruct"
BASE_HUB = "Qwen/Qwen2-VL-7B-Instruct"

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


_rename_key = rename_key  # visual.* -> model.visual.*; model.* -> model.language_model.*


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
            if self.backend == "native":
                raise
            # the reference retries with temporary PNG paths
            with tempfile.TemporaryDirectory(prefix="rtdmd_hpsv3_") as d:
                paths = []
                for i, im in enumerate(images):
                    p = os.path.join(d, f"{i:05d}.png")
                    im.save(p)
                    paths.append(p)
                out = self.inferencer.reward(paths, prompts)
        return mu_column(out)


class NativeInferencer:
    """``reward(pil_images, prompts) -> [B,2]`` with the native network and the Qwen2-VL processor."""

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor

    @property
    def device(self):
        return next(self.model.parameters()).device

    def inputs(self, images, prompts) -> dict:
        from ._hpsv3_native import PIXEL_BUDGET, format_prompt, resize_for_budget

        ip = self.processor.image_processor
        factor = int(ip.patch_size) * int(ip.merge_size)
        ims = [resize_for_budget(im, factor, PIXEL_BUDGET) for im in images]
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": format_prompt(p)}]}],
            tokenize=False, add_generation_prompt=True) for p in prompts]
        enc = self.processor(text=texts, images=ims, padding=True, return_tensors="pt")
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
        return {k: enc[k].to(self.device) for k in keys}

    def reward(self, images, prompts) -> torch.Tensor:
        return self.model(**self.inputs(images, prompts))


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    from ._hpsv3_native import load_safetensors

    if path.suffix == ".safetensors":
        try:
            return load_safetensors(path)
        except Exception as e:
            raise CorruptCheckpointError(
                f"hpsv3: cannot read checkpoint file '{path}' ({type(e).__name__}: {str(e)[:300]}); the file is "
                "truncated/corrupt; re-download it") from e
    return load_torch_state_dict(path, "hpsv3")  # torch.load(weights_only=True), plain state_dict


def _native_paths(ckpt_dir) -> tuple[Path | str, Path | str]:
    root = resolve_ckpt_root(ckpt_dir)
    _, ckpt = resolve_paths(root)
    if ckpt is None:
        if hub_allowed(ckpt_dir):
            import huggingface_hub

            return Path(huggingface_hub.hf_hub_download("MizzenAI/HPSv3", CHECKPOINT_NAMES[0])), BASE_HUB
        where = (root / "hpsv3" / CHECKPOINT_NAMES[0]) if root is not None else None
        raise missing("hpsv3", f"HPSv3 checkpoint ({CHECKPOINT_NAMES[0]} + Qwen2-VL-7B config)", where,
                      hub_id="MizzenAI/HPSv3")
    if not ckpt.is_file():
        raise missing("hpsv3", "checkpoint file", ckpt)
    for d in (ckpt.parent / BASE_SUBDIR, ckpt.parent):
        if (d / "config.json").is_file():
            return ckpt, d
    if hub_allowed(ckpt_dir):
        return ckpt, BASE_HUB
    raise missing("hpsv3", f"Qwen2-VL-7B-Instruct base files (config.json + tokenizer/processor files of "
                  f"'{BASE_HUB}') next to '{ckpt.name}'", ckpt.parent / "config.json", hub_id=BASE_HUB)


def build_native(ckpt_dir=None, device="cpu", dtype: torch.dtype | None = None) -> NativeInferencer:
    """Native HPSv3 from the layout above; the LM runs in the checkpoint's dtype unless ``dtype`` is given."""
    from transformers import AutoProcessor, Qwen2VLConfig
    from transformers.initialization import no_init_weights

    from ._hpsv3_native import REWARD_TOKEN, UNUSED_KEYS, HPSv3RewardNet, head_dims_from_state_dict, rename_key

    ckpt, base = _native_paths(ckpt_dir)
    sd = {rename_key(k): v for k, v in _read_checkpoint(Path(ckpt)).items() if k not in UNUSED_KEYS}
    emb = sd.get("model.language_model.embed_tokens.weight")
    if emb is None or any(f"rm_head.{i}.weight" not in sd for i in (0, 3, 5)):
        raise CorruptCheckpointError(
            f"hpsv3: checkpoint '{ckpt}' is not an HPSv3 reward model: it needs model.embed_tokens.weight and "
            f"rm_head.{{0,3,5}}.weight (found {len(sd)} keys, e.g. {sorted(sd)[:4]})")
    config = wrap_load_errors("hpsv3", base, lambda: Qwen2VLConfig.from_pretrained(str(base)))
    processor = wrap_load_errors("hpsv3", base, lambda: AutoProcessor.from_pretrained(str(base)))
    tok = processor.tokenizer
    if REWARD_TOKEN not in tok.get_vocab():
        tok.add_tokens([REWARD_TOKEN], special_tokens=True)
    rows = int(emb.shape[0])
    if len(tok) < 100 or len(tok) > rows:
        raise CorruptCheckpointError(
            f"hpsv3: the tokenizer in '{base}' has {len(tok)} tokens (with {REWARD_TOKEN}) but the checkpoint "
            f"'{ckpt}' embeds {rows}; missing/wrong tokenizer files (vocab.json, merges.txt, tokenizer.json)?")
    tok.padding_side = "right"
    config.text_config.vocab_size = rows
    config.text_config.pad_token_id = tok.pad_token_id
    if dtype is None:
        dtype = emb.dtype if emb.is_floating_point() else torch.float32
    prev = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with no_init_weights():  # every parameter is overwritten by the strict load below
            net = HPSv3RewardNet(config, tok.convert_tokens_to_ids(REWARD_TOKEN), head_dims_from_state_dict(sd))
    finally:
        torch.set_default_dtype(prev)
    net.rm_head.float()  # the package keeps the reward head in float32
    load_state_dict_strict(net, sd, Path(ckpt), "hpsv3", ignore=("position_ids",))
    net.eval().requires_grad_(False).to(device)
    return NativeInferencer(net, processor)


def _build_package(ckpt_dir=None, device="cpu"):
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
    return inf


def build(ckpt_dir=None, device="cpu", backend=None) -> HPSv3Scorer:
    backend = backend or BACKENDS[0]
    if backend == "native":
        return HPSv3Scorer(build_native(ckpt_dir, device), device=device, backend="native")
    if backend == "hpsv3":
        return HPSv3Scorer(_build_package(ckpt_dir, device), device=device, backend="hpsv3")
    raise ValueError(f"hpsv3: unknown backend '{backend}'; valid backends: {', '.join(BACKENDS)}")
