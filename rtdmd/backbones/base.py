"""The backbone protocol: everything the algorithms need from a model family, nothing more.

A backbone owns the frozen parts (text encoders, VAE, tokenizers) and knows how to build the
trainable/frozen *transformer roles* (teacher, generator, fake score). Algorithms only see:

* ``encode_prompts(prompts) -> Cond`` and ``empty_cond(batch) -> Cond`` (the unconditional
  embedding of the empty prompt, cached);
* ``latent_shape(batch)``, ``sigmas(step_list)`` (shifted schedule with terminal 0);
* ``velocity(net, x, sigma, cond)``: one forward, no CFG, ``sigma`` a ``[B]`` tensor in [0, 1];
  ``teacher_velocity(net, x, sigma, cond, uncond, scale)``: CFG (two forwards) or, for FLUX.1,
  the guidance embedding;
* ``decode(latents) -> images`` float ``[B,3,H,W]`` in [0, 1] (identity-like for toy2d);
* ``domain``: what ``decode`` produces and rewards score — :data:`IMAGES` (``"image"``) or
  :data:`POINTS` (``"points"``, toy2d). This is the one place the points/images distinction is
  declared; training, rewards and evaluation ask the backbone (or :func:`rtdmd.backbones.backbone_domain`
  before any model is built) instead of testing family names;
* ``load_transformer(role)`` -> a fresh ``nn.Module`` for a role (``"teacher"``, ``"generator"``,
  ``"fake_score"``) and ``lora_targets``.

Conditioning is a plain ``dict[str, Tensor]`` with the batch on dim 0 (wrapped in :class:`Cond`
so it can be indexed, repeated and moved) — families decide the keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import nn


class BackboneError(RuntimeError):
    """A model could not be built or loaded; the message names the id/path and how to fix it."""


@dataclass
class Cond:
    """Batched conditioning tensors (dim 0 = batch)."""

    tensors: dict[str, torch.Tensor]

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def index(self, idx) -> "Cond":
        return Cond({k: v[idx] for k, v in self.tensors.items()})

    def repeat(self, n: int) -> "Cond":
        """Repeat each row ``n`` times consecutively ([a, b] -> [a, a, b, b])."""
        return Cond({k: v.repeat_interleave(n, dim=0) for k, v in self.tensors.items()})

    def expand_to(self, batch: int) -> "Cond":
        """Broadcast a batch-1 conditioning to ``batch`` rows."""
        if self.batch_size == batch:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot broadcast conditioning of batch {self.batch_size} to {batch}")
        return Cond({k: v.expand(batch, *v.shape[1:]) for k, v in self.tensors.items()})

    def to(self, device=None, dtype=None) -> "Cond":
        out = {}
        for k, v in self.tensors.items():
            out[k] = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
        return Cond(out)

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        keys = conds[0].tensors.keys()
        return Cond({k: torch.cat([c.tensors[k] for c in conds], dim=0) for k in keys})


ROLES = ("teacher", "generator", "fake_score")
POINTS = "points"  # decode() yields [B, 2] points; rewards of domain "points"
IMAGES = "image"  # decode() yields [B, 3, H, W] images in [0, 1]; rewards of domain "image"


@runtime_checkable
class Backbone(Protocol):
    name: str
    family: str
    domain: str  # POINTS or IMAGES
    lora_targets: list[str]
    device: torch.device
    dtype: torch.dtype

    def encode_prompts(self, prompts: Sequence[str]) -> Cond: ...

    def empty_cond(self, batch: int) -> Cond: ...

    def latent_shape(self, batch: int) -> tuple[int, ...]: ...

    def sigmas(self, step_list: Sequence[int]) -> list[float]: ...

    def velocity(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor: ...

    def teacher_velocity(
        self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, uncond: Cond, scale: float
    ) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def load_transformer(self, role: str) -> nn.Module: ...


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``v_u + w (v_c - v_u)`` (spec §1.7)."""
    return v_uncond + scale * (v_cond - v_uncond)


def two_pass_cfg(
    velocity: Callable[[nn.Module, torch.Tensor, torch.Tensor, Cond], torch.Tensor],
    net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, uncond: Cond, scale: float,
) -> torch.Tensor:
    """CFG with one batched forward over [uncond; cond]; ``scale == 1`` skips the uncond pass."""
    if scale == 1.0:
        return velocity(net, x, sigma, cond)
    b = x.shape[0]
    both = Cond.cat([uncond.expand_to(b), cond])
    v = velocity(net, torch.cat([x, x]), torch.cat([sigma, sigma]), both)
    return cfg_combine(v[:b], v[b:], scale)
