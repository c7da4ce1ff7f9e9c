r"""FLUX.1-dev adapter (``FluxTransformer2DModel`` with guidance embedding, ``AutoencoderKL``, CLIP-L + T5).

Conventions implemented (spec §1.1–§1.3, §1.6, §1.7):

* Latent: ``[B, C_vae, H/f, W/f]`` (real: ``[B, 16, res/8, res/8]``) in the VAE's normalised
  space ``z = (latent − shift)·scaling``. Inside the predictor it is packed into 2×2 tokens
  ``[B, (h/2)(w/2), 4·C_vae]`` (feature ``4c + 2p + q`` ↔ latent pixel ``(2i+p, 2j+q)``,
  row-major tokens) with image ids ``(0, row, col)``; text ids are all zeros.
* ``velocity(net, x, σ, c)``: the transformer gets ``timestep = σ`` (it multiplies by 1000
  itself) and ``guidance = 1.0`` (generator / fake score, spec §1.7; never ``None``); it predicts
  ``v = ε − x0`` for ``x_σ = (1−σ)x0 + σε``; the output is unpacked back to ``x``'s layout.
* ``teacher_velocity``: ONE forward with the guidance embedding set to the CFG scale
  (``uncond`` is ignored). Checkpoints without a guidance embedding (e.g. schnell) fall back to
  two-pass CFG.
* Text (cond keys ``prompt_embeds`` ``[B, L, D_t5]`` and ``pooled`` ``[B, D_clip]``): T5 last
  hidden state (``max_sequence_length``, default 512, ``padding="max_length"``) and the CLIP-L
  ``pooler_output`` (77 tokens). No attention masks (as the reference pipeline).
* Sigmas: dynamic exponential shift with ``μ`` linear in ``L = (h/2)(w/2)`` from the scheduler
  config (``rtdmd.algorithms.schedules``, family ``flux1``).
* Decode: ``z / scaling + shift`` → VAE decode → ``x/2 + 0.5`` clamped; differentiable.

``model.quantize_timestep`` (true in params/flux1_dev.yaml) reproduces the
reference's bf16 cast of ``t = 1000σ`` (§12.6). The guidance value is passed unquantised.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rtdmd.backbones.base import Cond, two_pass_cfg
from rtdmd.backbones.hf_common import DiffusersBackbone, freeze, load, place_encoder, sigma_batch

DEFAULT_MAX_SEQ = 512
CLIP_LEN = 77


def pack(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W] -> [B, (H/2)(W/2), 4C]``."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack` for a latent of height ``h`` and width ``w``."""
    b, _, c4 = tokens.shape
    return tokens.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h2: int, w2: int, device) -> torch.Tensor:
    """``[h2·w2, 3]`` ids ``(0, row, col)`` of the packed token grid."""
    rows = torch.arange(h2, device=device).repeat_interleave(w2)
    cols = torch.arange(w2, device=device).repeat(h2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)


class Flux1Backbone(DiffusersBackbone):
    """FLUX.1-dev and ``tiny_flux1``. Cond keys: ``prompt_embeds``, ``pooled``."""

    family = "flux1"
    generator_guidance = 1.0

    def __init__(self, cfg, lora_targets: list[str], *, name: str, device="cpu", dtype=torch.float32):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        super().__init__(cfg, lora_targets, name=name, device=device, dtype=dtype)
        self.transformer_cls = FluxTransformer2DModel
        src, rev = self.source, self.revision
        self.clip_tokenizer = load(AutoTokenizer, src, "tokenizer", rev, "the CLIP tokenizer")
        enc = cfg.encoders_device
        self.clip = place_encoder(load(CLIPTextModel, src, "text_encoder", rev, "the CLIP text encoder", dtype=dtype),
                                  self.device, enc)
        self.t5_tokenizer = load(AutoTokenizer, src, "tokenizer_2", rev, "the T5 tokenizer")
        self.t5 = place_encoder(load(T5EncoderModel, src, "text_encoder_2", rev, "the T5 text encoder", dtype=dtype),
                                self.device, enc)
        self.vae = freeze(load(AutoencoderKL, src, "vae", rev, "the VAE", dtype=dtype), self.device)
        sched = load(FlowMatchEulerDiscreteScheduler, src, "scheduler", rev, "the scheduler config")
        self.scheduler_config = dict(sched.config)
        self.max_sequence_length = int(cfg.max_sequence_length or DEFAULT_MAX_SEQ)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = int(self.vae.config.latent_channels)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(self.vae.config.shift_factor or 0.0)

    # ---- text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = min(CLIP_LEN, int(self.clip.config.max_position_embeddings))
        ids = self.clip_tokenizer(prompts, padding="max_length", max_length=n, truncation=True,
                                  return_tensors="pt").input_ids
        pooled = self.clip(ids.to(self.device), output_hidden_states=False).pooler_output
        ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, return_tensors="pt").input_ids
        emb = self.t5(ids.to(self.device), output_hidden_states=False)[0]
        return Cond({"prompt_embeds": emb.to(self.dtype), "pooled": pooled.to(self.dtype)})

    # ---- latents and schedule -------------------------------------------------------------------
    def grid(self, resolution: int | None = None) -> int:
        res = int(resolution or self.resolution)
        if res % (2 * self.vae_scale):
            raise ValueError(f"resolution {res} must be a multiple of {2 * self.vae_scale} for {self.name}")
        return res // self.vae_scale

    def latent_shape(self, batch: int, resolution: int | None = None) -> tuple[int, ...]:
        g = self.grid(resolution)
        return (batch, self.latent_channels, g, g)

    def sigmas(self, step_list: Sequence[int], resolution: int | None = None) -> list[float]:
        from rtdmd.algorithms.schedules import shifted_sigmas

        g = self.grid(resolution)
        return shifted_sigmas(list(step_list), "flux1", image_seq_len=(g // 2) * (g // 2),
                              scheduler_config=self.scheduler_config)

    # ---- network ----------------------------------------------------------------------------------
    def _forward(self, net: nn.Module, x: torch.Tensor, sigma, cond: Cond, guidance: float) -> torch.Tensor:
        b, c, h, w = x.shape
        s = self.model_sigma(sigma_batch(sigma, b, x.device))
        emb = cond.tensors["prompt_embeds"].to(x.device)
        g = None
        if getattr(net.config, "guidance_embeds", False):
            g = torch.full((b,), float(guidance), device=x.device)
        out = net(
            hidden_states=self._cast_in(net, pack(x)),
            encoder_hidden_states=self._cast_in(net, emb),
            pooled_projections=self._cast_in(net, cond.tensors["pooled"].to(x.device)),
            timestep=s,
            img_ids=image_ids(h // 2, w // 2, x.device),
            txt_ids=torch.zeros(emb.shape[1], 3, device=x.device),
            guidance=g,
            return_dict=False,
        )[0]
        return unpack(out, h, w).to(x.dtype)

    def velocity(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self._forward(net, x, sigma, cond, self.generator_guidance)

    def teacher_velocity(self, net, x, sigma, cond: Cond, uncond: Cond, scale: float) -> torch.Tensor:
        if getattr(net.config, "guidance_embeds", False):
            return self._forward(net, x, sigma, cond, float(scale))
        s = sigma_batch(sigma, x.shape[0], x.device)
        return two_pass_cfg(self.velocity, net, x, s, cond, uncond, float(scale))

    # ---- decode -------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae_out_to_unit(self.vae.decode(z, return_dict=False)[0])
