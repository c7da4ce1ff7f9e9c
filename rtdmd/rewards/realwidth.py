"""Random-weight reward checkpoints at the **real widths** with few layers, in the published layouts.

:mod:`rtdmd.rewards.tiny` shrinks every dimension, which is enough to run the loaders but hides
anything that depends on the real geometry (head width, M-RoPE sections, the LayerNorm eps of a
wide layer, the 1024-wide ImageReward head input). The equivalence tests against the reference
packages (``tests/rewards/test_reference_equivalence.py``) load these checkpoints instead. Every
width, head count, activation, eps and patch geometry is the published one; only the layer counts
(and the tokenizer vocabularies, which are test tokenizers) shrink:

* ImageReward-v1.0: BLIP ViT-L/16 at 224 (width 1024, 16 heads, MLP 4096, LayerNorm eps 1e-6) with
  :data:`IMAGEREWARD_VIT_DEPTH` blocks; BERT-base text encoder (hidden 768, 12 heads, intermediate
  3072, 512 positions, eps 1e-12, cross-attention to the 1024-wide image tokens) with
  :data:`IMAGEREWARD_TEXT_LAYERS` layers; head 768→1024→128→64→16→1.
* HPSv2: open_clip ViT-H-14 (embed 1024; vision width 1280, head width 80, patch 14, image 224;
  text width 1024, 16 heads, 77 tokens, vocab 49408) with :data:`HPSV2_LAYERS` layers per tower.
* HPSv3: Qwen2-VL-7B-Instruct (hidden 3584, intermediate 18944, 28 heads / 4 KV heads, RMSNorm eps
  1e-6, rope θ 1e6, M-RoPE sections 16/24/24, SiLU; vision embed 1280, 16 heads, MLP ratio 4,
  quick-GELU, patch 14, merge 2, temporal patch 2, merger to 3584) with one LM layer and one vision
  block; reward head 3584→1024→16→2. ``config.json``, ``preprocessor_config.json`` and
  ``chat_template.json`` are written in the published (transformers-4) layout of the hub repository
  (a byte-level test tokenizer and a minimal Qwen chat template stand in for the real ones).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from . import tiny
from ._blip import VIT_LARGE

IMAGEREWARD_VIT_DEPTH = 2
IMAGEREWARD_TEXT_LAYERS = 2
IMAGEREWARD_VISION = dict(VIT_LARGE, depth=IMAGEREWARD_VIT_DEPTH)
IMAGEREWARD_TEXT = dict(hidden_size=768, num_hidden_layers=IMAGEREWARD_TEXT_LAYERS, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512, layer_norm_eps=1e-12)

HPSV2_LAYERS = 1
#: open_clip's ViT-H-14 config with the layer counts shrunk.
HPSV2_OPEN_CLIP = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": HPSV2_LAYERS, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": HPSV2_LAYERS},
}

#: Qwen2-VL-7B-Instruct ``config.json`` (published layout) with 1 LM layer and 1 vision block; the token
#: ids and the vocabulary size are filled in for the test tokenizer.
QWEN2VL_7B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "attention_dropout": 0.0,
    "hidden_act": "silu", "hidden_size": 3584, "intermediate_size": 18944, "initializer_range": 0.02,
    "max_position_embeddings": 32768, "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 1,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "use_cache": True, "use_sliding_window": False,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 1, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
}
HPSV3_HEAD = (1024, 16, 2)
#: Qwen2-VL-7B-Instruct ``preprocessor_config.json`` (published).
QWEN2VL_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
}

NAMES = ("imagereward", "hpsv2", "hpsv3")


def _build_imagereward(out: Path, seed: int) -> None:
    """The BLIP/BERT weights of :func:`rtdmd.rewards.tiny` with two scales changed, so that LayerNorm inputs
    are small (variance ~1e-3) as they are for some channels of trained models: there a wrong eps moves the
    score by >1e-5, which the equivalence test resolves (with default-init scales it would move by ~1e-7)."""
    from .imagereward import CKPT_SUBDIR

    tiny._build_imagereward(out, seed, IMAGEREWARD_VISION, IMAGEREWARD_TEXT)
    pt = out / CKPT_SUBDIR / "ImageReward.pt"
    sd = torch.load(pt, map_location="cpu", weights_only=True)
    sd["blip.visual_encoder.patch_embed.proj.weight"] *= 0.1
    for k in ("weight", "bias"):
        sd[f"blip.text_encoder.embeddings.LayerNorm.{k}"] *= 0.01
    torch.save(sd, pt)


def _build_hpsv2(out: Path, seed: int) -> None:
    tiny._build_hpsv2(out, seed, HPSV2_OPEN_CLIP)


def _build_hpsv3(out: Path, seed: int) -> None:
    from transformers import Qwen2VLConfig
    from transformers.initialization import no_init_weights

    from ._hpsv3_native import HPSv3RewardNet
    from .hpsv3 import CHECKPOINT_NAMES

    d = out / "hpsv3"
    proc, ids = tiny.tiny_qwen2vl_processor()
    tok = proc.tokenizer
    reward_id = len(tok)  # the loader appends <|Reward|>, as for the real files
    cfg = dict(QWEN2VL_7B, vocab_size=len(tok) + 1, bos_token_id=None, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, image_token_id=ids["<|image_pad|>"],
               video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
               vision_end_token_id=ids["<|vision_end|>"])
    d.mkdir(parents=True, exist_ok=True)
    proc.tokenizer.save_pretrained(d)  # tokenizer.json + tokenizer_config.json (read by transformers 4 and 5)
    # the processor files in the hub repository's layout (transformers-4 era)
    (d / "preprocessor_config.json").write_text(json.dumps(QWEN2VL_PREPROCESSOR, indent=2))
    (d / "chat_template.json").write_text(json.dumps({"chat_template": tiny.QWEN_CHAT_TEMPLATE}))
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    config = Qwen2VLConfig.from_pretrained(str(d))
    with no_init_weights():
        net = HPSv3RewardNet(config, reward_id, HPSV3_HEAD)
    g = torch.Generator().manual_seed(seed + 8)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 1 and name.endswith("weight") and ("norm" in name or "ln_q" in name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.ndim > 1 else 0.01))
    tiny.save_hpsv3_checkpoint(net, d / CHECKPOINT_NAMES[0], seed + 9)


_BUILDERS = {"imagereward": _build_imagereward, "hpsv2": _build_hpsv2, "hpsv3": _build_hpsv3}


def build_real_width_checkpoints(out_dir, names: Iterable[str] | None = None, seed: int = 0) -> Path:
    """Write real-width, few-layer random checkpoints for ``names`` (default :data:`NAMES`) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for n in names or NAMES:
        if n not in _BUILDERS:
            raise KeyError(f"no real-width checkpoint for '{n}'; available: {', '.join(NAMES)}")
        _BUILDERS[n](out, seed)
    return out
