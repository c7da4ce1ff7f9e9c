"""ImageReward v1.0 (rewards.md §1.6; BP fallback mode §3) — ``image-reward`` package, optional extra.

The real model (BLIP ViT-L + BERT-base cross-attention + MLP 768→…→1) comes
from the ``image-reward==1.5`` package (``pip install 'rtdmd[imagereward]'``,
with ``--no-deps`` + ``clip-anytorch fairscale datasets`` and setuptools<81; it
does not build on transformers 5 without several patches, spec §3a — run it in
a transformers-4 environment). Weights: ``<ckpt>/ImageReward/ImageReward.pt`` and
``<ckpt>/ImageReward/med_config.json``; the BLIP tokenizer also needs
``bert-base-uncased`` in the HF cache.

Glue implemented here (tested with a stub model exposing the package's
``score_gard(ids, mask, pixels)`` and ``blip.tokenizer``):

* eval path: pairs are scored directly (image i with prompt i), linear in the
  batch size, instead of the reference's ``inference_rank`` B×B matrix and
  diagonal (identical values; :func:`diagonal_of_square` keeps that route for
  backends that return B² rewards);
* preprocessing: eval — shortest edge 224 bicubic, centre crop 224, OpenAI
  normalisation; BP — bicubic resize to exactly 224×224 (no crop) on the float
  tensor, OpenAI normalisation;
* text: BLIP tokenizer, ``max_length=35``, padded to max length, truncated;
* the package's ``score_gard`` returns the standardised reward
  ``(r − 0.16717362830052426) / 1.0333394966054072`` (≈ −2..+2);
  :data:`REWARD_MEAN`/:data:`REWARD_STD` are checked against the loaded model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import RewardScorer, normalize, pil_clip_transform
from .ckpt import require_all, resolve_ckpt_root
from .errors import CorruptCheckpointError, MissingBackendError

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
TEXT_MAX_LENGTH = 35
IMAGE_SIZE = 224
CKPT_SUBDIR = "ImageReward"


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

    def __init__(self, model: Any, device="cpu", backend="image-reward", bp_token_max_length: int = TEXT_MAX_LENGTH):
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


def build(ckpt_dir=None, device="cpu", backend=None) -> ImageRewardScorer:
    root = resolve_ckpt_root(ckpt_dir)
    pt, med = require_all(root, [(f"{CKPT_SUBDIR}/ImageReward.pt", "ImageReward-v1.0 weights"),
                                 (f"{CKPT_SUBDIR}/med_config.json", "BLIP med config")], "imagereward",
                          hub_id="THUDM/ImageReward")
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
    model.eval().requires_grad_(False)
    return ImageRewardScorer(model, device=device)
