r"""FLUX.2-klein adapter (``Flux2Transformer2DModel`` + ``AutoencoderKLFlux2`` + Qwen3 text encoder).

Conventions implemented (spec §1.1–§1.3, §1.6, §1.7):

* Latent the algorithms work on: ``x ∈ [B, 4·C_vae, H/(2f), W/(2f)]`` (real: ``[B, 128, res/16,
  res/16]``, f = 8) — the 2×2-patchified VAE latent, BatchNorm-normalised with the VAE's running
  statistics. Tokens are the pixels of this grid, ``[B, h·w, 4·C_vae]``, row-major, with
  position ids ``(0, row, col, 0)``; text ids are ``(0, 0, 0, l)``.
* ``velocity(net, x, σ, c) = net(tokens(x), timestep=σ, ...)`` mapped back to ``x``'s layout;
  the network predicts ``v = ε − x0`` (rectified flow, ``x_σ = (1−σ)x0 + σε``). FLUX models get
  ``σ`` (= t/1000); klein has no guidance embedding (``guidance=None``; passed as 1.0 only if a
  checkpoint has ``guidance_embeds``). Teacher CFG: two passes, ``v_u + w(v_c − v_u)``
  (:func:`~rtdmd.backbones.base.two_pass_cfg`), uncond = the empty prompt.
* Text: Qwen3 chat template (one user message, generation prompt, ``enable_thinking=False``),
  padded/truncated to ``max_sequence_length`` (default 512), hidden states of the layers
  ``text_encoder_out_layers`` (default (9, 18, 27); index 0 = embeddings) concatenated on
  features → ``[B, L, 3·hidden]``. As in the reference the attention mask is used inside the
  text encoder only; the transformer attends to padding tokens too.
* Sigmas: ``shifted_sigmas(..., "flux2_klein", image_seq_len=h·w)`` with the pipeline's
  scheduler config (empirical μ; ``shift_terminal`` honoured there).
* Decode: ``z·sqrt(running_var + eps) + running_mean`` → un-patchify (channel ``4c+2p+q`` ↔
  pixel ``(2i+p, 2j+q)``) → VAE decode → ``x/2 + 0.5`` clamped to [0, 1]; differentiable.

Departures from the reference:

* ``model.quantize_timestep`` (true in the paper params, as the reference, §12.6) casts
  ``t = 1000σ`` to bf16 before dividing; false feeds σ in exact fp32 (tiny test models). Note diffusers itself casts the timestep to the hidden-state dtype, so a bf16
  model without autocast still sees a bf16-rounded σ (a different, finer grid than the reference).
* The text encoder is loaded as ``Qwen3Model`` (no LM head) from the pipeline's
  ``text_encoder/`` (a ``Qwen3ForCausalLM`` checkpoint): identical hidden states, less memory.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rtdmd.backbones.base import Cond, two_pass_cfg
from rtdmd.backbones.hf_common import DiffusersBackbone, freeze, load, place_encoder, sigma_batch

DEFAULT_MAX_SEQ = 512
DEFAULT_OUT_LAYERS = (9, 18, 27)


def patchify(z: torch.Tensor) -> torch.Tensor:
    """``[B, C, 2h, 2w] -> [B, 4C, h, w]``; channel ``4c + 2p + q`` holds pixel ``(2i+p, 2j+q)``."""
    b, c, hh, ww = z.shape
    return z.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, hh // 2, ww // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, 4C, h, w] -> [B, C, 2h, 2w]``."""
    b, c4, h, w = z.shape
    return z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, 2 * h, 2 * w)


def image_ids(h: int, w: int, device) -> torch.Tensor:
    """``[h·w, 4]`` ids ``(0, row, col, 0)`` in row-major token order."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], dim=-1)


def text_ids(length: int, device) -> torch.Tensor:
    """``[L, 4]`` ids ``(0, 0, 0, l)``."""
    ll = torch.arange(length, device=device)
    zeros = torch.zeros_like(ll)
    return torch.stack([zeros, zeros, zeros, ll], dim=-1)


class Flux2KleinBackbone(DiffusersBackbone):
    """FLUX.2-klein (4B / 9B and ``tiny_flux2``). Cond keys: ``prompt_embeds`` ``[B, L, D]``."""

    family = "flux2_klein"

    def __init__(self, cfg, lora_targets: list[str], *, name: str, device="cpu", dtype=torch.float32):
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
        from transformers import AutoTokenizer, Qwen3Model

        super().__init__(cfg, lora_targets, name=name, device=device, dtype=dtype)
        self.transformer_cls = Flux2Transformer2DModel
        src, rev = self.source, self.revision
        self.tokenizer = load(AutoTokenizer, src, "tokenizer", rev, "the Qwen3 tokenizer")
        self.text_encoder = place_encoder(
            load(Qwen3Model, src, "text_encoder", rev, "the Qwen3 text encoder", dtype=dtype), self.device,
            cfg.encoders_device)
        self.vae = freeze(load(AutoencoderKLFlux2, src, "vae", rev, "the FLUX.2 VAE", dtype=dtype), self.device)
        sched = load(FlowMatchEulerDiscreteScheduler, src, "scheduler", rev, "the scheduler config")
        self.scheduler_config = dict(sched.config)
        self.max_sequence_length = int(cfg.max_sequence_length or DEFAULT_MAX_SEQ)
        self.out_layers = tuple(cfg.text_encoder_out_layers or DEFAULT_OUT_LAYERS)
        n_hidden = self.text_encoder.config.num_hidden_layers
        bad = [k for k in self.out_layers if not -n_hidden <= k <= n_hidden]
        if bad:
            raise ValueError(
                f"model.text_encoder_out_layers {list(self.out_layers)} has entries {bad} outside the "
                f"{n_hidden + 1} hidden states of the text encoder at {src!r}")
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = 4 * int(self.vae.config.latent_channels)

    # ---- text -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False)
            for p in prompts
        ]
        tok = self.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=self.max_sequence_length, return_tensors="pt")
        out = self.text_encoder(input_ids=tok["input_ids"].to(self.device),
                                attention_mask=tok["attention_mask"].to(self.device),
                                output_hidden_states=True, use_cache=False)
        emb = torch.cat([out.hidden_states[k] for k in self.out_layers], dim=-1)
        return Cond({"prompt_embeds": emb.to(self.dtype)})

    # ---- latents and schedule -------------------------------------------------------------------
    def grid(self, resolution: int | None = None) -> int:
        res = int(resolution or self.resolution)
        if res % (2 * self.vae_scale):
            raise ValueError(f"resolution {res} must be a multiple of {2 * self.vae_scale} for {self.name}")
        return res // (2 * self.vae_scale)

    def latent_shape(self, batch: int, resolution: int | None = None) -> tuple[int, ...]:
        g = self.grid(resolution)
        return (batch, self.latent_channels, g, g)

    def sigmas(self, step_list: Sequence[int], resolution: int | None = None) -> list[float]:
        from rtdmd.algorithms.schedules import shifted_sigmas

        g = self.grid(resolution)
        return shifted_sigmas(list(step_list), "flux2_klein", image_seq_len=g * g,
                              scheduler_config=self.scheduler_config)

    # ---- network ----------------------------------------------------------------------------------
    def _forward(self, net: nn.Module, x: torch.Tensor, sigma, cond: Cond, guidance: float | None) -> torch.Tensor:
        b, c, h, w = x.shape
        s = self.model_sigma(sigma_batch(sigma, b, x.device))
        emb = cond.tensors["prompt_embeds"]
        tokens = x.reshape(b, c, h * w).transpose(1, 2)
        g = None
        if getattr(net.config, "guidance_embeds", False):
            g = torch.full((b,), 1.0 if guidance is None else float(guidance), device=x.device)
        out = net(
            hidden_states=self._cast_in(net, tokens),
            encoder_hidden_states=self._cast_in(net, emb.to(x.device)),
            timestep=s,
            img_ids=image_ids(h, w, x.device),
            txt_ids=text_ids(emb.shape[1], x.device),
            guidance=g,
            return_dict=False,
        )[0]
        return out[:, : h * w].transpose(1, 2).reshape(b, c, h, w).to(x.dtype)

    def velocity(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self._forward(net, x, sigma, cond, None)

    def teacher_velocity(self, net, x, sigma, cond: Cond, uncond: Cond, scale: float) -> torch.Tensor:
        s = sigma_batch(sigma, x.shape[0], x.device)
        return two_pass_cfg(self.velocity, net, x, s, cond, uncond, float(scale))

    # ---- decode -------------------------------------------------------------------------------
    def unnormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """BN-normalised patchified latent -> raw VAE latent ``[B, C_vae, 2h, 2w]``."""
        bn = self.vae.bn
        dt = self.vae.dtype
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, dt)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1).to(latents.device, dt) + self.vae.config.batch_norm_eps)
        return unpatchify(latents.to(dt) * std + mean)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        img = self.vae.decode(self.unnormalize(latents), return_dict=False)[0]
        return self.vae_out_to_unit(img)
