r"""Distribution-matching (DMD) generator loss and plain-DMD helpers (spec §4.1, §4.2).

Generic DMD loss (§4.1), shared by plain DMD and AC-DMD. Generator sample ``x`` (with grad),
fake reconstruction ``x_f`` and real/teacher reconstruction ``x_r`` of the same point (no grad)::

    g   = (x − x_r) − (x − x_f) = x_f − x_r
    g  ← g / mean_{C,H,W} |x − x_r|            (per sample; gradient_normalization)
    g  ← nan_to_num(g)
    L_DM = ½ · mean_{B,C,H,W} (x − sg(x − g))²     (computed in float64)

so ``∂L_DM/∂x = g/(B·C·H·W)`` and ``L_DM = ½·mean(g²)``; the sample is pushed along
``x_r − x_f``.

Plain DMD (§4.2, an option, not the released objective):

* timestep index ``k`` in ``[min_step, max_step]`` (``max_step`` capped at 999,
  ``R = max − min + 1``): uniform integer, or logit-normal
  ``u = sigmoid(N(m, s²))``, ``k = min(floor(u·R), R − 1) + min``;
* plain fake-score flow-matching loss ``L = mean_B mean_D (v_φ(x_t) − (z − x̂0))²``.

Deliberate choices:

* ``dmd_loss`` returns the loss cast to ``latents.dtype`` (the value is computed in float64;
  the cast has unit derivative so the gradient w.r.t. ``latents`` is unchanged). Metrics are
  python floats taken from the float64 computation.
* ``nan_to_num`` uses torch defaults (nan → 0, ±inf → ±max finite float64), as the reference.
* Index sampling draws from a CPU generator (the process-global CPU RNG if ``generator`` is
  None), matching the reference's CPU-RNG logit-normal draw; the result is moved to ``device``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["dmd_gradient", "dmd_loss", "sample_timestep_index", "plain_fake_score_loss"]

MAX_TIMESTEP_INDEX = 999


def _mean_nonbatch(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).mean(dim=1)


def dmd_gradient(
    latents: torch.Tensor,
    fake_x0: torch.Tensor,
    real_x0: torch.Tensor,
    normalize: bool = True,
) -> torch.Tensor:
    """The (normalised, nan-cleaned) DMD gradient ``g`` in float64, no autograd graph."""
    if not (latents.shape == fake_x0.shape == real_x0.shape):
        raise ValueError(
            "latents, fake_x0 and real_x0 must have the same shape, got "
            f"{tuple(latents.shape)}, {tuple(fake_x0.shape)}, {tuple(real_x0.shape)}"
        )
    if latents.dim() < 1:
        raise ValueError("latents must have a batch dimension")
    with torch.no_grad():
        x = latents.detach().to(torch.float64)
        xf = fake_x0.detach().to(torch.float64)
        xr = real_x0.detach().to(torch.float64)
        g = xf - xr
        if normalize:
            denom = _mean_nonbatch((x - xr).abs())
            g = g / denom.reshape([-1] + [1] * (g.dim() - 1))
        g = torch.nan_to_num(g)
    return g


def dmd_loss(
    latents: torch.Tensor,
    fake_x0: torch.Tensor,
    real_x0: torch.Tensor,
    normalize: bool = True,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """DMD generator loss of §4.1 → ``(loss, metrics)``.

    ``loss = ½·mean((x − sg(x − g))²)`` computed in float64 and returned in ``latents.dtype``;
    ``metrics = {"dmd/loss": float, "dmd/grad_norm": float(‖g‖₂)}``.
    """
    g = dmd_gradient(latents, fake_x0, real_x0, normalize)
    x = latents.to(torch.float64)
    target = (x.detach() - g).detach()
    loss64 = 0.5 * torch.mean((x - target) ** 2)
    vals = torch.stack([loss64.detach(), torch.linalg.vector_norm(g)]).tolist()  # one device→host read
    metrics = {"dmd/loss": vals[0], "dmd/grad_norm": vals[1]}
    return loss64.to(latents.dtype), metrics


def sample_timestep_index(
    batch: int,
    *,
    min_step: int,
    max_step: int,
    mode: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Integer timestep indices ``k ∈ [min_step, min(max_step, 999)]``, shape ``[batch]`` (§4.2)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got batch={batch!r}")
    min_step = int(min_step)
    max_step = min(int(max_step), MAX_TIMESTEP_INDEX)
    if min_step < 0:
        raise ValueError(f"min_step must be >= 0, got min_step={min_step}")
    if max_step < min_step:
        raise ValueError(
            f"max_step (capped at {MAX_TIMESTEP_INDEX}) must be >= min_step, "
            f"got max_step={max_step}, min_step={min_step}"
        )
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if mode == "uniform":
        k = torch.randint(min_step, max_step + 1, (batch,), generator=generator, device=gen_device)
    elif mode == "logit_normal":
        if not (math.isfinite(logit_std) and logit_std >= 0):
            raise ValueError(f"logit_std must be a finite number >= 0, got logit_std={logit_std!r}")
        r = max_step - min_step + 1
        z = torch.randn((batch,), generator=generator, device=gen_device, dtype=torch.float64)
        u = torch.sigmoid(z * float(logit_std) + float(logit_mean))
        k = torch.clamp(torch.floor(u * r).to(torch.int64), max=r - 1) + min_step
    else:
        raise ValueError(f"mode must be 'uniform' or 'logit_normal', got mode={mode!r}")
    k = k.to(torch.int64)
    if device is not None:
        k = k.to(device)
    return k


def plain_fake_score_loss(
    fake_velocity: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor
) -> torch.Tensor:
    """Plain fake-score flow-matching loss ``mean((v_φ − (z − x̂0))²)`` in float32 (§4.2)."""
    if not (fake_velocity.shape == noise.shape == x0.shape):
        raise ValueError(
            "fake_velocity, noise and x0 must have the same shape, got "
            f"{tuple(fake_velocity.shape)}, {tuple(noise.shape)}, {tuple(x0.shape)}"
        )
    dtype = torch.float64 if fake_velocity.dtype == torch.float64 else torch.float32
    target = (noise.to(dtype) - x0.to(dtype)).detach()
    return torch.mean((fake_velocity.to(dtype) - target) ** 2)
