"""Native ImageReward-v1.0 network (BLIP ViT + image-grounded BERT + MLP head), written for rtdmd.

Only architecture facts of the published checkpoint are used (module names, shapes,
constants); the code is our own. The module tree reproduces the key names of
``ImageReward.pt`` so the file loads with a strict key check:

* ``blip.visual_encoder``: timm-style ViT — ``cls_token``, ``pos_embed``,
  ``patch_embed.proj`` (conv, stride = patch), ``blocks.N.{norm1, attn.qkv, attn.proj,
  norm2, mlp.fc1, mlp.fc2}``, ``norm``; pre-norm blocks, LayerNorm eps 1e-6, exact GELU,
  fused qkv with bias. Output: every token (``[CLS]`` + patches) after ``norm``.
* ``blip.text_encoder``: BERT (no pooler, no token-type embeddings) where every layer
  has bidirectional self-attention, then cross-attention to the image tokens, then the
  feed-forward block (post-norm, LayerNorm eps from ``med_config.json``, exact GELU).
  Padding is masked with an additive ``-10000`` bias, as in the original BERT code.
* ``blip.vision_proj`` / ``blip.text_proj``: the contrastive projections (256-d). They are
  in the checkpoint but not used by the reward.
* ``mlp.layers.{0,2,4,6,7}``: 768→1024→128→64→16→1, dropouts, no activations, applied to
  the ``[CLS]`` output; reward = ``(raw − mean) / std``.

Vision hyper-parameters are not in ``med_config.json`` (ImageReward hard-codes ViT-L/16 at
224); :data:`VIT_LARGE` is the default and an optional ``"rtdmd_vision"`` dict in
``med_config.json`` overrides it (used by the tiny test checkpoint).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .aesthetic import AestheticMLP

#: BLIP ViT-L/16 as used by ImageReward-v1.0.
VIT_LARGE = dict(image_size=224, patch_size=16, width=1024, depth=24, heads=16, mlp_dim=4096)
#: Width of BLIP's image-text contrastive projections (``vision_proj``/``text_proj``).
PROJ_DIM = 256
#: ImageReward's reward head widths after the text hidden size.
HEAD_DIMS = (1024, 128, 64, 16, 1)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, e = x.shape
    return x.transpose(1, 2).reshape(b, n, h * e)


# --------------------------------------------------------------------------- vision


class _FusedAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(*(_split_heads(t, self.heads) for t in (q, k, v)))
        return self.proj(_merge_heads(y))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _FusedAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _FeedForward(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class BlipViT(nn.Module):
    """Image ``[B,3,S,S]`` (normalised) -> tokens ``[B, 1 + (S/P)², width]``."""

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int, mlp_dim: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        n = (image_size // patch_size) ** 2
        self.image_size = image_size
        self.patch_embed = _PatchEmbed(patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, width))
        self.blocks = nn.ModuleList(_ViTBlock(width, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"BLIP ViT expects {self.image_size}x{self.image_size} pixels, got "
                             f"{tuple(pixels.shape[-2:])}")
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# --------------------------------------------------------------------------- text


class _QKV(nn.Module):
    def __init__(self, hidden: int, kv_width: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)


class _ResidualNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)`` — BERT's ``*.output`` sub-modules."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _BertAttention(nn.Module):
    def __init__(self, hidden: int, kv_width: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.self = _QKV(hidden, kv_width)
        self.output = _ResidualNorm(hidden, hidden, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        p, h = self.self, self.heads
        y = F.scaled_dot_product_attention(_split_heads(p.query(x), h), _split_heads(p.key(context), h),
                                           _split_heads(p.value(context), h), attn_mask=bias)
        return self.output(_merge_heads(y), x)


class _Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int, enc_width: int, eps: float):
        super().__init__()
        self.attention = _BertAttention(hidden, hidden, heads, eps)
        self.crossattention = _BertAttention(hidden, enc_width, heads, eps)
        self.intermediate = _Dense(hidden, inter)
        self.output = _ResidualNorm(inter, hidden, eps)

    def forward(self, x, image, bias):
        x = self.attention(x, x, bias)
        x = self.crossattention(x, image, None)  # every image token is valid
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_pos: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_pos, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos)[None])


class _Encoder(nn.Module):
    def __init__(self, layers: list[_BertLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class BlipTextEncoder(nn.Module):
    """BERT whose layers cross-attend to image tokens; returns the last hidden states."""

    def __init__(self, vocab_size: int, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                 intermediate_size: int, max_position_embeddings: int, encoder_width: int,
                 layer_norm_eps: float = 1e-12):
        super().__init__()
        self.vocab_size = vocab_size
        self.embeddings = _Embeddings(vocab_size, hidden_size, max_position_embeddings, layer_norm_eps)
        self.encoder = _Encoder([_BertLayer(hidden_size, num_attention_heads, intermediate_size, encoder_width,
                                            layer_norm_eps) for _ in range(num_hidden_layers)])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids)
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.encoder.layer:
            x = layer(x, image, bias)
        return x


# --------------------------------------------------------------------------- ImageReward


class _Blip(nn.Module):
    def __init__(self, vision: dict, text: dict, proj_dim: int):
        super().__init__()
        self.visual_encoder = BlipViT(**vision)
        self.text_encoder = BlipTextEncoder(encoder_width=vision["width"], **text)
        self.vision_proj = nn.Linear(vision["width"], proj_dim)
        self.text_proj = nn.Linear(text["hidden_size"], proj_dim)
        self.tokenizer = None  # set by the loader (BERT tokenizer + [DEC]/[ENC])


TEXT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings")


def configs_from_med(med: dict) -> tuple[dict, dict]:
    """(vision, text) constructor kwargs from a BLIP ``med_config.json`` dict (KeyError if incomplete)."""
    text = {k: int(med[k]) for k in TEXT_KEYS}
    text["layer_norm_eps"] = float(med.get("layer_norm_eps", 1e-12))
    vision = dict(VIT_LARGE, **med.get("rtdmd_vision", {}))
    return vision, text


class ImageRewardNet(nn.Module):
    """``score_gard(ids, mask, pixels) -> [B,1]`` standardised reward (the package's interface)."""

    def __init__(self, vision: dict, text: dict, mean: float, std: float, proj_dim: int = PROJ_DIM):
        super().__init__()
        self.blip = _Blip(vision, text, proj_dim)
        self.mlp = AestheticMLP((text["hidden_size"],) + HEAD_DIMS)
        self.mean, self.std = float(mean), float(std)

    def raw_reward(self, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        image = self.blip.visual_encoder(pixels)
        hidden = self.blip.text_encoder(ids, mask, image)
        return self.mlp(hidden[:, 0, :])

    def score_gard(self, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        return (self.raw_reward(ids, mask, pixels) - self.mean) / self.std
