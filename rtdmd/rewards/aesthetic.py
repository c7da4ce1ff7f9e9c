"""LAION improved aesthetic predictor (rewards.md §1.5).

* image tower of ``openai/clip-vit-large-patch14`` (``<ckpt>/clip-vit-large-patch14/``),
  ``get_image_features(...).pooler_output`` (transformers 5), L2-normalised;
* MLP ``sac+logos+ava1-l14-linearMSE.pth`` (``<ckpt>/``): a plain state_dict
  with keys ``layers.{0,2,4,6,7}.{weight,bias}``, Linear 768→1024 (Dropout 0.2)
  →128 (Dropout 0.2) →64 (Dropout 0.1) →16 →1, **no non-linearities**. Loaded
  with ``torch.load(weights_only=True)`` only. Layer widths are read from the
  state_dict (the tiny checkpoint uses the tiny CLIP's projection width).
* preprocessing: the PIL CLIP image processor on the uint8 image (shortest edge
  224 bicubic, centre crop, /255, OpenAI normalisation);
* output: one rating per image on the 1–10 scale (≈5–6 for good images); the
  prompt is ignored.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _hfclip as H
from .base import RewardScorer
from .ckpt import hf_source, load_state_dict_strict, load_torch_state_dict, require_path, resolve_ckpt_root
from .errors import CorruptCheckpointError

CLIP_DIR, CLIP_HUB = "clip-vit-large-patch14", "openai/clip-vit-large-patch14"
MLP_FILE = "sac+logos+ava1-l14-linearMSE.pth"
DROPOUTS = (0.2, 0.2, 0.1)


class AestheticMLP(nn.Module):
    """The LAION MLP: 5 linear layers, dropouts after the first three, no activations."""

    def __init__(self, dims: tuple[int, ...] = (768, 1024, 128, 64, 16, 1)):
        super().__init__()
        d = dims
        self.layers = nn.Sequential(
            nn.Linear(d[0], d[1]), nn.Dropout(DROPOUTS[0]),
            nn.Linear(d[1], d[2]), nn.Dropout(DROPOUTS[1]),
            nn.Linear(d[2], d[3]), nn.Dropout(DROPOUTS[2]),
            nn.Linear(d[3], d[4]),
            nn.Linear(d[4], d[5]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


LINEAR_INDICES = (0, 2, 4, 6, 7)


def mlp_dims_from_state_dict(sd: dict[str, torch.Tensor], path, scorer="aesthetic") -> tuple[int, ...]:
    try:
        dims = [sd[f"layers.{LINEAR_INDICES[0]}.weight"].shape[1]]
        dims += [sd[f"layers.{i}.weight"].shape[0] for i in LINEAR_INDICES]
    except KeyError as e:
        raise CorruptCheckpointError(f"{scorer}: '{path}' is not the LAION aesthetic MLP state_dict "
                                     f"(missing {e}; expected keys layers.{{0,2,4,6,7}}.weight/bias)") from e
    return tuple(int(x) for x in dims)


class AestheticScorer(RewardScorer):
    name = "aesthetic"
    differentiable = False

    def __init__(self, clip_model, mlp: AestheticMLP, image_processor, device="cpu", backend="transformers"):
        super().__init__(device, backend)
        self.clip = clip_model.to(self.device)
        self.mlp = mlp.eval().requires_grad_(False).to(self.device)
        self.image_processor = image_processor

    def _score(self, batch, prompts, metadata):
        images = batch.uint8_nchw() if batch.uniform else batch.pil()
        px = H.processor_pixels(self.image_processor, images, self.device, self.dtype)
        emb = H.image_embeds(self.clip, px)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.mlp(emb).squeeze(1)


def build(ckpt_dir=None, device="cpu", backend=None) -> AestheticScorer:
    root = resolve_ckpt_root(ckpt_dir)
    mlp_path = require_path(root, MLP_FILE, "aesthetic", "LAION aesthetic MLP", is_dir=False)
    src = hf_source(root, CLIP_DIR, CLIP_HUB, "aesthetic", ckpt_dir, "CLIP model+processor")
    sd = load_torch_state_dict(mlp_path, "aesthetic")
    mlp = AestheticMLP(mlp_dims_from_state_dict(sd, mlp_path))
    load_state_dict_strict(mlp, sd, mlp_path, "aesthetic")
    clip = H.load_clip_model(src, "aesthetic", device)
    proj = clip.config.projection_dim
    if mlp.layers[0].in_features != proj:
        raise CorruptCheckpointError(f"aesthetic: MLP '{mlp_path}' expects {mlp.layers[0].in_features}-d "
                                     f"embeddings but the CLIP model at '{src}' projects to {proj}")
    return AestheticScorer(clip, mlp, H.load_image_processor(src, "aesthetic"), device=device)
