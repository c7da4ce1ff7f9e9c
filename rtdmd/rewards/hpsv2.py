"""HPSv2.1 through open_clip directly (rewards.md §1.2, BP path §3).

Loading (the reference's recipe, without the ``hpsv2`` package whose PyPI
wheel is broken):

1. ``open_clip.create_model("ViT-H-14")`` (no pretrained download), fp32;
2. load ``<ckpt>/open_clip_pytorch_model.bin`` (laion2B ViT-H-14);
3. load ``<ckpt>/HPS_v2.1_compressed.pt["state_dict"]`` over it.

Both files are read with ``torch.load(weights_only=True)``. An optional
``<ckpt>/hpsv2_open_clip_config.json`` replaces the architecture (the tiny
test checkpoints use it). Tokenizer: ``open_clip.get_tokenizer(arch)`` (77-token BPE).

Preprocessing (both paths, on the float tensor): longer side → 224 bicubic,
symmetric zero pad to 224×224 (left/top ``pad//2``), normalise with the
model's ``visual.image_mean/std`` (OpenAI constants when absent).
Score: ``cos(image, text)`` (features L2-normalised, no logit scale), ≈0.27–0.35.
The reference's ``precision="amp"`` is not used: fp32 on every device.
"""

from __future__ import annotations

import torch

from . import _openclip as OC
from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, RewardScorer, normalize, resize_max_and_pad
from .ckpt import hub_allowed, require_all, resolve_ckpt_root

ARCH = "ViT-H-14"
BASE_FILE = "open_clip_pytorch_model.bin"
HPS_FILE = "HPS_v2.1_compressed.pt"
ARCH_FILE = "hpsv2_open_clip_config.json"
BASE_HUB = ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", BASE_FILE)
HPS_HUB = ("xswu/HPSv2", HPS_FILE)
IMAGE_SIZE = 224


class HPSv2Scorer(RewardScorer):
    name = "hpsv2"
    differentiable = True

    def __init__(self, model, tokenizer, device="cpu", backend="open_clip", image_size: int = IMAGE_SIZE):
        super().__init__(device, backend)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = tokenizer
        self.image_size = image_size
        visual = getattr(model, "visual", None)
        self.mean = tuple(getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN)
        self.std = tuple(getattr(visual, "image_std", None) or OPENAI_CLIP_STD)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        x = resize_max_and_pad(x, self.image_size)
        if x.shape[1] == 4:  # a 4th (mask) channel stays unnormalised
            return torch.cat([normalize(x[:, :3], self.mean, self.std), x[:, 3:]], dim=1)
        return normalize(x, self.mean, self.std)

    def _forward(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        img = self.model.encode_image(pixels, normalize=True)
        txt = self.model.encode_text(tokens, normalize=True)
        return (img * txt).sum(-1)  # diag(image_features @ text_features.T)

    def _cast(self, x):
        p = next(self.model.parameters())
        return x.to(device=p.device, dtype=p.dtype)

    def _score(self, batch, prompts, metadata):
        px = torch.cat([self.transform(self._cast(t)) for t in batch.float_list()])
        return self._forward(px, prompts)

    def _score_bp(self, images, prompts, metadata):
        return self._forward(self.transform(self._cast(images)), prompts)


def _hub_file(repo_file):
    from huggingface_hub import hf_hub_download

    return hf_hub_download(*repo_file)


def build(ckpt_dir=None, device="cpu", backend=None) -> HPSv2Scorer:
    from pathlib import Path

    root = resolve_ckpt_root(ckpt_dir)
    if root is None and hub_allowed(ckpt_dir):
        base, hps, arch_file = Path(_hub_file(BASE_HUB)), Path(_hub_file(HPS_HUB)), None
    else:
        base, hps = require_all(root, [(BASE_FILE, "laion2B ViT-H-14 open_clip weights"),
                                       (HPS_FILE, "HPSv2.1 weights")], "hpsv2", hub_id="xswu/HPSv2")
        arch_file = root / ARCH_FILE
    arch = OC.register_arch(arch_file, "hpsv2") if arch_file is not None and arch_file.is_file() else ARCH
    model = OC.create_model(arch, "hpsv2")
    OC.load_weights(model, base, "hpsv2")
    OC.load_weights(model, hps, "hpsv2", key="state_dict")
    size = getattr(model.visual, "image_size", IMAGE_SIZE)
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return HPSv2Scorer(model, OC.tokenizer_for(arch), device=device, image_size=size)
