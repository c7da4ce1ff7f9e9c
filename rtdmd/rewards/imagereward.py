"""ImageReward v1.0 (rewards.md §1.6; BP fallback mode §3).

Two backends build the same network and share the scoring glue below:

* ``"native"`` (default): our own BLIP ViT-L/16 + image-grounded BERT + MLP
  (:mod:`rtdmd.rewards._blip`), runs on the installed torch/transformers. Checkpoint layout::

      <ckpt>/ImageReward/ImageReward.pt        plain state_dict (THUDM/ImageReward), torch.load(weights_only=True)
      <ckpt>/ImageReward/med_config.json       BLIP BERT config (vocab 30524, hidden 768, 12 layers, ...)
      <ckpt>/ImageReward/bert-base-uncased/    BERT tokenizer files (vocab.txt and/or tokenizer.json);
                                               ``<ckpt>/bert-base-uncased/`` is accepted too

  The state_dict is loaded with a strict key check (only ``*.position_ids`` buffers may be
  absent/extra); the tokenizer gets BLIP's two extra tokens ``[DEC]``, ``[ENC]`` and its size
  must equal ``vocab_size`` of ``med_config.json`` (transformers 5 silently returns a 5-token
  tokenizer when the vocab is missing, spec §3a).
* ``"image-reward"``: the ``image-reward==1.5`` package (optional extra ``rtdmd[imagereward]``,
  ``--no-deps`` + ``clip-anytorch fairscale datasets``, setuptools<81; needs transformers<5 or
  the patches of spec §3a). Same ``ImageReward/`` files; its tokenizer needs ``bert-base-uncased``
  in the HF cache.

Glue (both backends; the model exposes ``score_gard(ids, mask, pixels)`` and ``blip.tokenizer``):

* eval path: pairs are scored directly (image i with prompt i), linear in the batch size,
  instead of the reference's ``inference_rank`` B×B matrix and diagonal (identical values;
  :func:`diagonal_of_square` keeps that route for backends that return B² rewards);
* preprocessing: eval — shortest edge 224 bicubic (PIL), centre crop 224, OpenAI
  normalisation; BP — bicubic resize to exactly 224×224 (no crop) on the float tensor, OpenAI
  normalisation (differentiable);
* text: BLIP tokenizer, ``max_length=35``, padded to max length, truncated. The ids go to the
  text encoder as tokenised, first token ``[CLS]`` — ImageReward's ``score``/``inference_rank``/
  ``score_gard`` do **not** swap in ``[ENC]`` (BLIP's ITM head does; ImageReward does not);
* reward: MLP on the ``[CLS]`` output, standardised ``(r − 0.16717362830052426) / 1.0333394966054072``
  (≈ −2..+2); :data:`REWARD_MEAN`/:data:`REWARD_STD` are checked against the loaded model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import RewardScorer, normalize, pil_clip_transform
from .ckpt import (load_state_dict_strict, load_torch_state_dict, read_json, require_all, resolve_ckpt_root,
                   wrap_load_errors)
from .errors import CorruptCheckpointError, MissingBackendError, MissingCheckpointError

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
TEXT_MAX_LENGTH = 35
IMAGE_SIZE = 224
CKPT_SUBDIR = "ImageReward"
TOKENIZER_DIR = "bert-base-uncased"
#: BLIP's ``init_tokenizer`` appends these to the BERT vocab (``[DEC]`` = bos, ``[ENC]`` = extra special).
BLIP_EXTRA_TOKENS = ("[DEC]", "[ENC]")
BACKENDS = ("native", "image-reward")


def diagonal_of_square(rewards: Any, n: int) -> torch.Tensor:
    """B² rewards (every image × every prompt, row = prompt) -> the B paired ones."""
    t = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
    if t.numel() == n:
        return t
    if t.numel() != n * n:
        raise RuntimeError(f"imagereward: expected {n} or {n * n} rewards, got {t.numel()}")
    return t.reshape(n, n).diagonal()


def standardise(raw: torch.Tensor) -> torch.Tensor:
    return (raw - REWARD_MEAN) / REWARD_STD


class ImageRewardScorer(RewardScorer):
    name = "imagereward"
    differentiable = True

    def __init__(self, model: Any, device="cpu", backend="native", bp_token_max_length: int = TEXT_MAX_LENGTH):
        super().__init__(device, backend)
        self.model = model
        self.bp_token_max_length = bp_token_max_length

    def modules(self):
        return [self.model] if isinstance(self.model, torch.nn.Module) else []

    def _tokens(self, prompts: list[str], max_length: int):
        enc = self.model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length,
                                        return_tensors="pt")
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def _dtype(self):
        try:
            return next(self.model.parameters()).dtype
        except (AttributeError, StopIteration):
            return torch.float32

    def _score(self, batch, prompts, metadata):
        ids, mask = self._tokens(prompts, TEXT_MAX_LENGTH)
        px = torch.cat([pil_clip_transform(im, IMAGE_SIZE) for im in batch.pil()]).to(self.device, self._dtype())
        return torch.as_tensor(self.model.score_gard(ids, mask, px)).reshape(-1)

    def _score_bp(self, images, prompts, metadata):
        ids, mask = self._tokens(prompts, self.bp_token_max_length)
        x = images.to(self.device, self._dtype())
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False)
        return self.model.score_gard(ids, mask, normalize(x)).reshape(-1)


def _shim_transformers() -> None:
    """The import-level shim: re-expose helpers image-reward imports from ``modeling_utils``."""
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    for n in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(mu, n) and hasattr(pu, n):
            setattr(mu, n, getattr(pu, n))


def _require_files(ckpt_dir):
    root = resolve_ckpt_root(ckpt_dir)
    pt, med = require_all(root, [(f"{CKPT_SUBDIR}/ImageReward.pt", "ImageReward-v1.0 weights"),
                                 (f"{CKPT_SUBDIR}/med_config.json", "BLIP med config")], "imagereward",
                          hub_id="THUDM/ImageReward")
    return root, pt, med


def load_blip_tokenizer(path, vocab_size: int):
    """BERT tokenizer from ``path`` + BLIP's ``[DEC]``/``[ENC]``; its size must equal ``vocab_size``."""
    from transformers import BertTokenizer

    tok = wrap_load_errors("imagereward", path, lambda: BertTokenizer.from_pretrained(str(path)))
    vocab = tok.get_vocab()
    extra = [t for t in BLIP_EXTRA_TOKENS if t not in vocab]
    if extra:
        tok.add_tokens(extra, special_tokens=True)
    if len(tok) != vocab_size or len(tok) < 100:
        raise CorruptCheckpointError(
            f"imagereward: the BERT tokenizer in '{path}' has {len(tok)} tokens (with {list(BLIP_EXTRA_TOKENS)}), "
            f"but med_config.json says vocab_size={vocab_size} (bert-base-uncased + 2 = 30524). A missing or "
            "wrong vocab.txt/tokenizer.json causes this (transformers 5 returns a 5-token tokenizer then).")
    return tok


def build_native(ckpt_dir=None, device="cpu"):
    """The native network from ``<ckpt>/ImageReward/`` (strict key check), eval mode, no grads."""
    from ._blip import ImageRewardNet, configs_from_med

    root, pt, med_path = _require_files(ckpt_dir)
    tok_dir = next((d for d in (pt.parent / TOKENIZER_DIR, root / TOKENIZER_DIR) if d.is_dir()), None)
    if tok_dir is None:
        raise MissingCheckpointError(
            f"imagereward: missing the BERT tokenizer directory '{pt.parent / TOKENIZER_DIR}' (files of the hub "
            "repo bert-base-uncased: vocab.txt and/or tokenizer.json + tokenizer_config.json). Layout in "
            "rtdmd/rewards/imagereward.py; tiny test files: rtdmd.rewards.tiny.build_tiny_reward_checkpoints(dir).")
    med = read_json(med_path, "imagereward")
    try:
        vision, text = configs_from_med(med)
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"imagereward: '{med_path}' is not a BLIP med_config.json ({e!r} missing "
                                     "or invalid)") from e
    sd = load_torch_state_dict(pt, "imagereward")
    model = ImageRewardNet(vision, text, REWARD_MEAN, REWARD_STD)
    load_state_dict_strict(model, sd, pt, "imagereward")
    model.blip.tokenizer = load_blip_tokenizer(tok_dir, text["vocab_size"])
    return model.eval().requires_grad_(False).to(device)


def _build_package(ckpt_dir, device):
    _, pt, med = _require_files(ckpt_dir)
    try:
        _shim_transformers()
        import ImageReward as RM
    except ImportError as e:
        raise MissingBackendError(
            "reward 'imagereward' needs the image-reward package: pip install 'rtdmd[imagereward]' "
            "(image-reward==1.5 --no-deps, clip-anytorch, fairscale, datasets, setuptools<81); it needs "
            "transformers<5 (spec/rewards.md §3a)") from e
    try:
        model = RM.load(str(pt), device=str(device), med_config=str(med))
    except Exception as e:
        raise CorruptCheckpointError(f"imagereward: cannot build ImageReward from '{pt}' ({type(e).__name__}: "
                                     f"{str(e)[:300]}); on transformers 5 the package needs patches "
                                     "(spec/rewards.md §3a)") from e
    tok = getattr(getattr(model, "blip", None), "tokenizer", None)
    if tok is None or len(tok) < 1000:
        raise CorruptCheckpointError("imagereward: the BLIP tokenizer has no vocabulary (bert-base-uncased is "
                                     "not in the HF cache and the hub is unreachable)")
    for attr, ref in (("mean", REWARD_MEAN), ("std", REWARD_STD)):
        v = getattr(model, attr, ref)
        if abs(float(v) - ref) > 1e-9:
            raise CorruptCheckpointError(f"imagereward: model.{attr}={v}, expected {ref}")
    return model.eval().requires_grad_(False)


def build(ckpt_dir=None, device="cpu", backend=None) -> ImageRewardScorer:
    backend = backend or BACKENDS[0]
    if backend == "native":
        return ImageRewardScorer(build_native(ckpt_dir, device), device=device, backend="native")
    if backend == "image-reward":
        return ImageRewardScorer(_build_package(ckpt_dir, device), device=device, backend="image-reward")
    raise ValueError(f"imagereward: unknown backend '{backend}'; valid backends: {', '.join(BACKENDS)}")
