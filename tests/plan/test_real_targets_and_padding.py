"""The real params files on small stand-ins: every single-block LoRA target of FLUX.2-klein 4B / 9B
is adapted, and SD3's CLIP-to-T5 padding runs with a real width gap (tiny CLIPs 16 + 24 < T5 64)."""
import pytest
import torch

from rtdmd.config import load_params
from rtdmd.plan.models import simulated_loading
from rtdmd.plan.validate import flux2_spec


def _log(msg):
    pass


@pytest.mark.parametrize("key,singles", [("flux2_4b", 20), ("flux2_9b", 24)])
def test_real_single_block_target_lists_adapt_every_single_block(key, singles):
    from rtdmd.backbones import build_backbone
    from rtdmd.train.roles import _load_role

    params = load_params(key, ["model.tiny=false", "model.resolution=32", "model.max_sequence_length=8",
                               "model.text_encoder_out_layers=[1,2,3]"])
    single_targets = [t for t in params.lora.targets if t.startswith("single_transformer_blocks.")]
    assert len(single_targets) == singles
    spec = flux2_spec(heads=2, head_dim=16, double=1, single=24)  # ≥ 24 single blocks, tiny width
    with simulated_loading(spec, torch.float32):
        backbone = build_backbone(params, "cpu", torch.float32)
        net = _load_role(backbone, params, "generator", [], _log)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in net.named_modules() if n.endswith(".lora_A")}
    to_out = sorted(n for n in adapted if n.startswith("single_transformer_blocks.") and n.endswith(".to_out"))
    assert to_out == sorted(single_targets), to_out  # the listed blocks; blocks ≥ `singles` stay un-adapted
    fused = [n for n in adapted if n.endswith(".to_qkv_mlp_proj")]
    assert len(fused) == 24  # the bare suffix target adapts every single block
    x = torch.randn(backbone.latent_shape(1))
    v = backbone.velocity(net, x, torch.tensor([0.5]), backbone.encode_prompts(["a red cat"]))
    assert v.shape == x.shape and torch.isfinite(v).all()


def _sd3_spec(clip_widths=(16, 24), t5_width=64):
    clip = [{"cls": "CLIPTextModelWithProjection", "cfg": dict(
        vocab_size=512, hidden_size=w, intermediate_size=2 * w, projection_dim=w, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77)} for w in clip_widths]
    t5 = {"cls": "T5EncoderModel", "cfg": dict(vocab_size=512, d_model=t5_width, d_kv=8, d_ff=40, num_layers=1,
                                               num_heads=2, relative_attention_num_buckets=8,
                                               feed_forward_proj="gated-gelu", is_encoder_decoder=False)}
    transformer = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=t5_width,
                       caption_projection_dim=16, pooled_projection_dim=sum(clip_widths), pos_embed_max_size=32)
    vae = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
               latent_channels=16, norm_num_groups=4, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609)
    return {"transformer": {"cls": "SD3Transformer2DModel", "cfg": transformer}, "text_encoders": [*clip, t5],
            "vae": {"cls": "AutoencoderKL", "cfg": vae}, "scheduler": dict(num_train_timesteps=1000, shift=3.0)}


def test_sd3_pads_clip_features_to_the_t5_width():
    from rtdmd.backbones import build_backbone

    params = load_params("sd3m", ["model.tiny=false", "model.resolution=32", "model.max_sequence_length=8"])
    with simulated_loading(_sd3_spec(), torch.float32):
        backbone = build_backbone(params, "cpu", torch.float32)
        net = backbone.load_transformer("teacher")
    cond = backbone.encode_prompts(["a red cat", "two dogs"])
    emb = cond.tensors["prompt_embeds"]
    assert emb.shape == (2, 77 + 8, 64)
    clip_part = emb[:, :77]
    assert torch.count_nonzero(clip_part[..., 40:]) == 0  # the 24-wide gap is zero padding
    assert torch.count_nonzero(clip_part[..., :40]) > 0
    assert cond.tensors["pooled"].shape == (2, 40)
    x = torch.randn(backbone.latent_shape(2))
    v = backbone.velocity(net, x, torch.tensor([0.3, 0.7]), cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
