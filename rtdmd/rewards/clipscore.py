"""CLIPScore (rewards.md §1.4, BP path §3).

* model + processor: ``openai/clip-vit-large-patch14`` (``<ckpt>/clip-vit-large-patch14/``);
* image transform on the float tensor (both paths): torchvision-style
  ``Resize(224)`` on the shortest edge, **bilinear** with antialias, then
  ``CenterCrop(224)`` and OpenAI normalisation (sizes/mean/std read from the
  processor config);
* text: padded to ``max_length`` 77, truncated;
* score: ``logits_per_image.diag()/100`` = ``exp(logit_scale)·cos/100``, which is
  the cosine for the real model (logit scale 100), typically ≈0.3.

The eval path sees the 8-bit-quantised image (as the reference MultiScorer
feeds it), the BP path the float image.
"""

from __future__ import annotations

import torch

from . import _hfclip as H
from .base import RewardScorer, clip_tensor_transform
from .ckpt import hf_source, resolve_ckpt_root

MODEL_DIR, MODEL_HUB = "clip-vit-large-patch14", "openai/clip-vit-large-patch14"
LOGIT_DIVISOR = 100.0


class CLIPScoreScorer(RewardScorer):
    name = "clipscore"
    differentiable = True

    def __init__(self, model, image_processor, tokenizer, device="cpu", backend="transformers"):
        super().__init__(device, backend)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.resize, self.crop, self.mean, self.std = H.processor_geometry(image_processor)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return clip_tensor_transform(x, self.resize, self.mean, self.std, mode="bilinear", crop=self.crop)

    def _forward(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        enc = H.tokenize(self.tokenizer, prompts, self.device)
        img = H.image_embeds(self.model, pixel_values)
        txt = H.text_embeds(self.model, enc)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        # logits_per_image.diagonal() without the B×B matrix
        return self.model.logit_scale.exp() * (img * txt).sum(-1) / LOGIT_DIVISOR

    def _score(self, batch, prompts, metadata):
        px = torch.cat([self.transform(H.cast_like(t, self.model)) for t in batch.float_list()])
        return self._forward(px, prompts)

    def _score_bp(self, images, prompts, metadata):
        return self._forward(self.transform(H.cast_like(images, self.model)), prompts)


def build(ckpt_dir=None, device="cpu", backend=None) -> CLIPScoreScorer:
    root = resolve_ckpt_root(ckpt_dir)
    src = hf_source(root, MODEL_DIR, MODEL_HUB, "clipscore", ckpt_dir, "CLIP model+processor")
    model = H.load_clip_model(src, "clipscore", device)
    return CLIPScoreScorer(model, H.load_image_processor(src, "clipscore"), H.load_tokenizer(src, "clipscore"),
                           device=device)
