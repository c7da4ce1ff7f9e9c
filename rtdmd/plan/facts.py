"""The real configurations of the five backbones, written down as facts, with their sources.

The weights and configs cannot be downloaded here; these are the published hyper-parameters of
the diffusers / transformers classes the adapters load (``rtdmd.backbones``):

* FLUX.2 [klein] 4B / 9B: diffusers' ``Flux2Transformer2DModel`` and ``AutoencoderKLFlux2`` as
  set by ``scripts/convert_flux2_to_diffusers.py`` for the klein checkpoints (3.88 B / 9.08 B
  transformer parameters); the text encoders are Qwen3-4B / Qwen3-8B (their ``config.json`` on the
  hub); ``joint_attention_dim = 3 × Qwen hidden`` (three stacked hidden-state layers,
  ``spec/tiny_backbones.md``). The 20 / 24 single blocks are confirmed by the LoRA target lists of
  ``spec/algorithm.md`` §10.1. Entries marked ``unsure`` are inferred from the parameter totals.
* SD3-Medium / SD3.5-Medium: ``transformer/config.json`` of the ``stabilityai`` releases (2.03 B /
  2.24 B parameters; SD3.5-M = MMDiT-X with dual attention in layers 0–12 and RMS qk-norm); CLIP-L,
  OpenCLIP bigG and T5-XXL text encoders; the 16-channel SD3 VAE (scaling 1.5305, shift 0.0609).
* FLUX.1-dev: ``transformer/config.json`` of ``black-forest-labs/FLUX.1-dev`` (11.9 B parameters,
  19 double + 38 single blocks, guidance embedding); CLIP-L + T5-XXL; VAE scaling 0.3611,
  shift 0.1159.
* Scheduler configs: ``scheduler/scheduler_config.json`` of the same releases (FLUX: dynamic
  exponential shift μ between 0.5 and 1.15 over 256…4096 image tokens; SD3: static shift 3.0).
"""
from __future__ import annotations

from typing import Any

TRANSFORMERS: dict[str, dict[str, Any]] = {
    # FLUX.2 [klein] 4B: Flux2Transformer2DModel
    "flux2_4b": {"cls": "Flux2Transformer2DModel", "cfg": dict(
        patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False),
        "unsure": "num_layers 5, heads 24 (width 3072), mlp_ratio 3 inferred; 20 single blocks confirmed by §10.1"},
    "flux2_9b": {"cls": "Flux2Transformer2DModel", "cfg": dict(
        patch_size=1, in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=128,
        num_attention_heads=32, joint_attention_dim=12288, timestep_guidance_channels=256, mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False),
        "unsure": "num_layers 8, heads 32 (width 4096) inferred; 24 single blocks confirmed by §10.1"},
    "sd3m": {"cls": "SD3Transformer2DModel", "cfg": dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192), "unsure": ""},
    "sd35m": {"cls": "SD3Transformer2DModel", "cfg": dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
        "unsure": "dual_attention_layers 0..12 (MMDiT-X)"},
    "flux1_dev": {"cls": "FluxTransformer2DModel", "cfg": dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)), "unsure": ""},
}

TEXT_ENCODERS: dict[str, list[dict[str, Any]]] = {
    "flux2_4b": [{"name": "Qwen3-4B", "cls": "Qwen3Model", "tokens": 512, "cfg": dict(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)}],
    "flux2_9b": [{"name": "Qwen3-8B", "cls": "Qwen3Model", "tokens": 512, "cfg": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)}],
}
_CLIP_L = {"name": "CLIP-L/14 text", "cls": "CLIPTextModelWithProjection", "tokens": 77, "cfg": dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    projection_dim=768, max_position_embeddings=77)}
_CLIP_G = {"name": "OpenCLIP bigG/14 text", "cls": "CLIPTextModelWithProjection", "tokens": 77, "cfg": dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    projection_dim=1280, max_position_embeddings=77)}
_T5 = {"name": "T5-XXL encoder", "cls": "T5EncoderModel", "cfg": dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
    is_encoder_decoder=False)}
TEXT_ENCODERS["sd3m"] = [_CLIP_L, _CLIP_G, {**_T5, "tokens": 128}]
TEXT_ENCODERS["sd35m"] = [_CLIP_L, _CLIP_G, {**_T5, "tokens": 128}]
TEXT_ENCODERS["flux1_dev"] = [{**_CLIP_L, "cls": "CLIPTextModel", "name": "CLIP-L/14 text"}, {**_T5, "tokens": 512}]

_VAE16 = {"cls": "AutoencoderKL", "cfg": dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False), "factor": 8}
VAES = {
    "flux2_4b": {"cls": "AutoencoderKLFlux2", "cfg": dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=32, norm_num_groups=32, patch_size=(2, 2)), "factor": 8,
        "unsure": "FLUX.2 VAE: 32 latent channels, FLUX.1-like block widths"},
    "sd3m": _VAE16, "sd35m": _VAE16, "flux1_dev": _VAE16,
}
VAES["flux2_9b"] = VAES["flux2_4b"]


# VAE latent scaling of the SD3 / FLUX.1 VAEs (vae/config.json); FLUX.2 normalises with BatchNorm
VAE_SCALING = {"sd3m": (1.5305, 0.0609), "sd35m": (1.5305, 0.0609), "flux1_dev": (0.3611, 0.1159)}

_FLUX_SCHED = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                   base_image_seq_len=256, max_image_seq_len=4096)
SCHEDULERS = {
    "flux2_4b": {**_FLUX_SCHED, "time_shift_type": "exponential"},
    "flux2_9b": {**_FLUX_SCHED, "time_shift_type": "exponential"},
    "sd3m": dict(num_train_timesteps=1000, shift=3.0),
    "sd35m": dict(num_train_timesteps=1000, shift=3.0),
    "flux1_dev": dict(_FLUX_SCHED),
}

# the backbone keys of params/*.yaml and their families
FAMILY = {"flux2_4b": "flux2_klein", "flux2_9b": "flux2_klein", "sd3m": "sd3", "sd35m": "sd3", "flux1_dev": "flux1"}
KEYS = tuple(TRANSFORMERS)

# ---- stage-2 reward models (rl.reward_weights of every real params file: clipscore, hpsv2, pickscore,
# geneval). Published architectures, loaded in fp32 on the GPU by rtdmd/rewards (rewards.md §1):
# * clipscore: openai/clip-vit-large-patch14 (config.json: ViT-L/14 vision 24×1024, text 12×768,
#   projection 768; 428 M parameters), 224 px;
# * pickscore: yuvalkirstain/PickScore_v1, fine-tuned laion/CLIP-ViT-H-14-laion2B-s32B-b79K
#   (ViT-H/14 vision 32×1280, text 24×1024, projection 1024; 986 M), 224 px;
# * hpsv2: HPSv2.1 = open_clip ViT-H-14 (laion2B) fine-tuned — the same ViT-H/14 shape (986 M), 224 px;
# * geneval: Mask2Former Swin-S COCO instance (facebook/mask2former-swin-small-coco-instance, 69 M;
#   Swin-S depths 2-2-18-2, embed 96, window 7) and the OpenAI ViT-L/14 colour CLIP (its vision
#   tower is what classifies the crops; 16 crops per batch, rewards/geneval.py COLOUR_BATCH).
_CLIP_L_PAIR = dict(
    text_config=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14),
    projection_dim=768)
_CLIP_H_PAIR = dict(
    text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, max_position_embeddings=77),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14),
    projection_dim=1024)
REWARD_MODELS: dict[str, dict[str, Any]] = {
    "clipscore": {"model": "openai/clip-vit-large-patch14", "cls": "CLIPModel", "cfg": _CLIP_L_PAIR,
                  "params_published": 428e6, "image_size": 224, "differentiable": True},
    "pickscore": {"model": "yuvalkirstain/PickScore_v1 (CLIP ViT-H/14)", "cls": "CLIPModel", "cfg": _CLIP_H_PAIR,
                  "params_published": 986e6, "image_size": 224, "differentiable": True},
    "hpsv2": {"model": "HPSv2.1 (open_clip ViT-H-14)", "cls": "CLIPModel", "cfg": _CLIP_H_PAIR,
              "params_published": 986e6, "image_size": 224, "differentiable": True},
    "geneval": {"model": "Mask2Former Swin-S COCO instance + OpenAI CLIP ViT-L/14 colour head",
                "cls": "Mask2FormerForUniversalSegmentation",
                "cfg": dict(backbone_config=dict(model_type="swin", embed_dim=96, depths=[2, 2, 18, 2],
                                                 num_heads=[3, 6, 12, 24], window_size=7,
                                                 out_features=["stage1", "stage2", "stage3", "stage4"]),
                            num_labels=80),
                "colour": {"cls": "CLIPModel", "cfg": _CLIP_L_PAIR, "crops": 16},
                "params_published": 69e6 + 428e6, "image_size": 384, "differentiable": False,
                "unsure": "detector input 384 px (shortest edge of the HF processor config)"},
}
