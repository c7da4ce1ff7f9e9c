"""PickScore v1 (rewards.md §1.1, BP path §3).

* model: HF ``CLIPModel`` ``yuvalkirstain/PickScore_v1`` (``<ckpt>/PickScore_v1/``);
* processor: ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (``<ckpt>/CLIP-ViT-H-14-laion2B-s32B-b79K/``);
* score: ``exp(logit_scale) * cos(text_i, image_i) / 26`` (≈0.85–0.92 with the
  real weights; the paper tables show ×26, i.e. 22–24).

Eval path: the PIL ``CLIPImageProcessor`` (shortest edge 224 **bicubic**,
centre crop 224, /255, OpenAI normalisation). BP path: a tensor transform built
from the same processor config but with **bilinear** (antialiased) resize, as
in the reference.
"""

from __future__ import annotations

import torch

from . import _hfclip as H
from .base import RewardScorer, clip_tensor_transform
from .ckpt import hf_source, resolve_ckpt_root

MODEL_DIR, MODEL_HUB = "PickScore_v1", "yuvalkirstain/PickScore_v1"
PROC_DIR, PROC_HUB = "CLIP-ViT-H-14-laion2B-s32B-b79K", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
#: The reference divides by 26 ("normalize to 0-1"; not a hard bound).
PICKSCORE_DIVISOR = 26.0


class PickScoreScorer(RewardScorer):
    name = "pickscore"
    differentiable = True

    def __init__(self, model, image_processor, tokenizer, device="cpu", backend="transformers"):
        super().__init__(device, backend)
        self.model = model.to(self.device)
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.resize, self.crop, self.mean, self.std = H.processor_geometry(image_processor)

    def _similarity(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        enc = H.tokenize(self.tokenizer, prompts, self.device)
        img = H.image_embeds(self.model, H.cast_like(pixel_values, self.model))
        txt = H.text_embeds(self.model, enc)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        # diag(exp(s) * T @ I^T) computed pairwise
        return self.model.logit_scale.exp() * (txt * img).sum(-1) / PICKSCORE_DIVISOR

    def _score(self, batch, prompts, metadata):
        px = H.processor_pixels(self.image_processor, batch.pil(), self.device, self.dtype)
        return self._similarity(px, prompts)

    def _score_bp(self, images, prompts, metadata):
        x = images.to(device=self.device, dtype=self.dtype)
        px = clip_tensor_transform(x, self.resize, self.mean, self.std, mode="bilinear", crop=self.crop)
        return self._similarity(px, prompts)


def build(ckpt_dir=None, device="cpu", backend=None) -> PickScoreScorer:
    root = resolve_ckpt_root(ckpt_dir)
    model_src = hf_source(root, MODEL_DIR, MODEL_HUB, "pickscore", ckpt_dir, "CLIP model")
    proc_src = hf_source(root, PROC_DIR, PROC_HUB, "pickscore", ckpt_dir, "CLIP processor")
    model = H.load_clip_model(model_src, "pickscore", device)
    return PickScoreScorer(model, H.load_image_processor(proc_src, "pickscore"),
                           H.load_tokenizer(proc_src, "pickscore"), device=device)
