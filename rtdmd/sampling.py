"""Few-step generation for any backbone (spec §3.1 step 7, §4.4 of data_and_eval).

``generate`` runs the CPS sampler (``cps_step``) over the shifted schedule of a step list and
returns the final clean estimate; with ``eta = 0`` it is the Euler ODE sampler, which is how the
multi-step teacher is sampled (``teacher_step_list(n)``), with CFG when ``guidance != 1``.
Noise comes from a CPU ``torch.Generator`` seeded with ``seed`` (initial latents and every CPS
injection), so a fixed seed gives identical outputs. ``seed`` may also be a sequence of ints, one
per sample: each sample then draws its own noise from its own generator, so a sample's output does
not depend on which batch (or rank) it was generated in, up to float rounding of batched kernels
(used by the evaluation matrix).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rtdmd.algorithms.cps import cps_step
from rtdmd.backbones.base import Backbone, Cond


def teacher_step_list(num_steps: int) -> list[int]:
    """``num_steps`` evenly spaced raw timesteps 1000 … 1000/num_steps (terminal 0 added later)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return [round(1000 * (1 - i / num_steps), 6) for i in range(num_steps)]


def _noise_source(seed: int | Sequence[int], batch: int):
    """``draw(shape) -> Tensor``: one generator for the batch, or one per sample for a seed list."""
    if isinstance(seed, (int, float)) or (torch.is_tensor(seed) and seed.dim() == 0):
        gen = torch.Generator().manual_seed(int(seed))
        return lambda shape: torch.randn(shape, generator=gen)
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} per-sample seeds for a batch of {batch}")
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return lambda shape: torch.stack([torch.randn(shape[1:], generator=g) for g in gens])


@torch.no_grad()
def generate(
    backbone: Backbone,
    net: nn.Module,
    prompts: Sequence[str] | None = None,
    *,
    cond: Cond | None = None,
    step_list: Sequence[float],
    eta: float,
    seed: int | Sequence[int],
    guidance: float = 1.0,
    teacher_mode: bool = False,
    return_latents: bool = False,
) -> torch.Tensor:
    """Generate decoded samples (images in [0,1], or toy2d points) for ``prompts``.

    ``teacher_mode`` uses ``backbone.teacher_velocity`` (CFG / guidance embedding with
    ``guidance``); otherwise the generator convention (no CFG, spec §1.7).
    """
    if cond is None:
        if not prompts:
            raise ValueError("generate needs a non-empty prompt list or a conditioning")
        cond = backbone.encode_prompts(list(prompts))
    batch = cond.batch_size
    uncond = backbone.empty_cond(batch) if teacher_mode else None
    sigmas = backbone.sigmas(list(step_list))
    shape = backbone.latent_shape(batch)
    draw = _noise_source(seed, batch)
    x = draw(shape).to(backbone.device, backbone.dtype)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        s = torch.full((batch,), float(sigma), device=x.device, dtype=torch.float32)
        if teacher_mode:
            v = backbone.teacher_velocity(net, x, s, cond, uncond, guidance)
        else:
            v = backbone.velocity(net, x, s, cond)
        noise = None
        if eta > 0 and sigma_next > 0:
            noise = draw(tuple(x.shape)).to(x.device, x.dtype)
        x = cps_step(x, v, sigma, sigma_next, eta, noise=noise)
    return x if return_latents else backbone.decode(x)
