r"""SD3-Medium / SD3.5-Medium adapter (``SD3Transformer2DModel``, ``AutoencoderKL``, CLIP-L + CLIP-G + T5).

Conventions implemented (spec §1.1–§1.3, §1.6, §1.7):

* Latent: ``[B, C_vae, H/f, W/f]`` (real: ``[B, 16, res/8, res/8]``) in the VAE's normalised
  space ``z = (latent − shift) · scaling``; the transformer consumes it directly (it patchifies
  internally).
* ``velocity(net, x, σ, c) = net(x, timestep = 1000·σ (fp32), ...)``; the network predicts
  ``v = ε − x0`` for ``x_σ = (1−σ)x0 + σε`` (the FlowMatch Euler step is ``x + (σ' − σ)v``).
  Teacher CFG: two passes ``v_u + w(v_c − v_u)``, uncond = the empty prompt (three encoders).
* Text (``cond`` keys ``prompt_embeds`` ``[B, 77 + L_t5, D_t5]`` and ``pooled`` ``[B, P_L + P_G]``):
  CLIP-L and CLIP-G penultimate hidden states (77 tokens, ``padding="max_length"``)
  concatenated on features, zero-padded to the T5 width, then concatenated along the sequence
  with the T5 last hidden state (``max_sequence_length`` tokens, default 128 as in the
  reference training configs — note the diffusers pipeline default is 256); ``pooled`` = the
  two CLIP text projections concatenated. No attention masks (as the reference pipeline).
  If the pipeline has no T5 (``text_encoder_3`` absent) its part is zeros of width
  ``joint_attention_dim``, as in diffusers.
* Sigmas: static shift from the scheduler config (``shift``, 3.0), ``rtdmd.algorithms.schedules``.
* Decode: ``z / scaling + shift`` → VAE decode → ``x/2 + 0.5`` clamped; differentiable.

Departures: the SD3-M ``patch_embed_linear`` FSDP work-around (§8.1) only changes parameter
layout, not the function; FSDP2 shards the convolution as it is, so params validation refuses
``model.patch_embed_linear: true`` (docs/reference_departures.md). The CLIP sequence is refused, not
silently cropped, when both CLIP widths together exceed the T5 width.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rtdmd.backbones.base import Cond, two_pass_cfg
from rtdmd.backbones.hf_common import DiffusersBackbone, freeze, load, place_encoder, load_config, sigma_batch

DEFAULT_MAX_SEQ = 128
CLIP_LEN = 77


class SD3Backbone(DiffusersBackbone):
    """SD3-M, SD3.5-M and ``tiny_sd3``. Cond keys: ``prompt_embeds``, ``pooled``."""

    family = "sd3"

    def __init__(self, cfg, lora_targets: list[str], *, name: str, device="cpu", dtype=torch.float32):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        super().__init__(cfg, lora_targets, name=name, device=device, dtype=dtype)
        self.transformer_cls = SD3Transformer2DModel
        src, rev = self.source, self.revision
        self.tokenizers = [load(AutoTokenizer, src, f"tokenizer{s}", rev, f"the {n} tokenizer")
                           for s, n in (("", "CLIP-L"), ("_2", "CLIP-G"))]
        enc = cfg.encoders_device
        self.clips = [place_encoder(load(CLIPTextModelWithProjection, src, f"text_encoder{s}", rev,
                                         f"the {n} text encoder", dtype=dtype), self.device, enc)
                      for s, n in (("", "CLIP-L"), ("_2", "CLIP-G"))]
        self.transformer_config = load_config(SD3Transformer2DModel, src, "transformer", rev, "the SD3 transformer")
        if self._has_component("text_encoder_3"):
            self.t5_tokenizer = load(AutoTokenizer, src, "tokenizer_3", rev, "the T5 tokenizer")
            self.t5 = place_encoder(load(T5EncoderModel, src, "text_encoder_3", rev, "the T5 text encoder",
                                         dtype=dtype), self.device, enc)
            self.t5_width = int(self.t5.config.d_model)
        else:
            self.t5_tokenizer, self.t5 = None, None
            self.t5_width = int(self.transformer_config["joint_attention_dim"])
        clip_width = sum(int(c.config.hidden_size) for c in self.clips)
        if clip_width > self.t5_width:
            raise ValueError(f"{src!r}: CLIP widths ({clip_width}) exceed the T5 width ({self.t5_width})")
        self.vae = freeze(load(AutoencoderKL, src, "vae", rev, "the VAE", dtype=dtype), self.device)
        sched = load(FlowMatchEulerDiscreteScheduler, src, "scheduler", rev, "the scheduler config")
        self.scheduler_config = dict(sched.config)
        self.max_sequence_length = int(cfg.max_sequence_length or DEFAULT_MAX_SEQ)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = int(self.vae.config.latent_channels)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(self.vae.config.shift_factor or 0.0)

    def _has_component(self, name: str) -> bool:
        idx = os.path.join(os.path.expanduser(self.source), "model_index.json")
        if not os.path.isfile(idx):
            return True  # hub ids: the SD3/SD3.5 releases ship T5
        with open(idx) as f:
            entry = json.load(f).get(name)
        return bool(entry and entry[0] is not None)

    # ---- text ---------------------------------------------------------------------------------
    def _clip(self, i: int, prompts: list[str]):
        tok = self.tokenizers[i]
        n = min(CLIP_LEN, int(self.clips[i].config.max_position_embeddings))
        ids = tok(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
        out = self.clips[i](ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        (h_l, p_l), (h_g, p_g) = self._clip(0, prompts), self._clip(1, prompts)
        clip = torch.cat([h_l, h_g], dim=-1)
        clip = F.pad(clip, (0, self.t5_width - clip.shape[-1]))
        if self.t5 is not None:
            ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length,
                                    truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
            t5 = self.t5(ids.to(self.device))[0]
        else:
            t5 = clip.new_zeros(len(prompts), self.max_sequence_length, self.t5_width)
        emb = torch.cat([clip, t5.to(clip.dtype)], dim=1)
        pooled = torch.cat([p_l, p_g], dim=-1)
        return Cond({"prompt_embeds": emb.to(self.dtype), "pooled": pooled.to(self.dtype)})

    # ---- latents and schedule -------------------------------------------------------------------
    def grid(self, resolution: int | None = None) -> int:
        res = int(resolution or self.resolution)
        patch = int(self.transformer_config.get("patch_size", 2))
        if res % (self.vae_scale * patch):
            raise ValueError(f"resolution {res} must be a multiple of {self.vae_scale * patch} for {self.name}")
        return res // self.vae_scale

    def latent_shape(self, batch: int, resolution: int | None = None) -> tuple[int, ...]:
        g = self.grid(resolution)
        return (batch, self.latent_channels, g, g)

    def sigmas(self, step_list: Sequence[int], resolution: int | None = None) -> list[float]:
        from rtdmd.algorithms.schedules import shifted_sigmas

        return shifted_sigmas(list(step_list), "sd3", scheduler_config=self.scheduler_config)

    # ---- network ----------------------------------------------------------------------------------
    def velocity(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        s = sigma_batch(sigma, x.shape[0], x.device)
        out = net(
            hidden_states=self._cast_in(net, x),
            encoder_hidden_states=self._cast_in(net, cond.tensors["prompt_embeds"].to(x.device)),
            pooled_projections=self._cast_in(net, cond.tensors["pooled"].to(x.device)),
            timestep=1000.0 * s,
            return_dict=False,
        )[0]
        return out.to(x.dtype)

    def teacher_velocity(self, net, x, sigma, cond: Cond, uncond: Cond, scale: float) -> torch.Tensor:
        s = sigma_batch(sigma, x.shape[0], x.device)
        return two_pass_cfg(self.velocity, net, x, s, cond, uncond, float(scale))

    # ---- decode -------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae_out_to_unit(self.vae.decode(z, return_dict=False)[0])
