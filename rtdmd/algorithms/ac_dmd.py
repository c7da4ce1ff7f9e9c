r"""AC-DMD: ambient-consistent DMD on trajectory sub-intervals (spec §5.1 – §5.6).

Start point (§5.1) ``x_s`` at level ``s`` (``"next_sigma"``: the executed CPS output;
``"fixed_boundary"``: ``CPS(x_in, v, σ_c → min(σ_c, boundary))``), ``s`` clamped to [0, 1].

Renoising timestep (§5.2)::

    start = N·s + offset,  end = end_timestep (end ← start + 1 if end ≤ start)
    τ ~ U[start, end] per sample,  τ ← clamp(τ, lo, hi),  t = τ/N

Sub-interval forward noising (§5.3), ``z ~ N(0, I)``::

    a = (1 − t)/(1 − s),  σ_ts = sqrt(max(t² − a²s², 1e−12)),  x_t = a·x_s + σ_ts·z

(``a(1 − s) = 1 − t`` and ``a²s² + σ_ts² = t²``, so the interpolation marginal is preserved and
kernels compose.)

Theoretical target (§5.4), ``∂x_t/∂t`` at fixed ``(x_s, z)``::

    T = −x_s/(1 − s) + [(t + (1 − t)·s²/(1 − s)²)/σ_ts]·z
    move_scale_out:  T' = σ_ts·T, scale = σ_ts;   else T' = T, scale = 1

Fake-score AC loss (§5.5)::

    w = nan_to_num(clamp(1/max(scale², 1e−12), c_min, c_max))      (nan → 0, +inf → c_max)
    L_AC = mean_{B,C,H,W} [ w·(scale·v_φ − T')² ]

Generator loss (§5.6): shared-noise back-projections ``x_r = CPS(x_t, v_r, t → s, η, ξ')``,
``x_f = CPS(x_t, v_f, t → s, η, ξ')`` (so ``x_f − x_r = [s cosθ(1 − t) − t(1 − s)](v_f − v_r)``)
and ``L_gen = L_DM(x_s, x_f, x_r)`` of §4.1.

Deliberate choices / departures:

* Arithmetic in float32 or wider (float64 inputs stay float64); ``x_t`` is returned in
  ``x_start.dtype``, targets/weights/losses in the compute dtype.
* ``s = 1`` is not supported by :func:`subinterval_forward`/:func:`subinterval_target`
  (division by ``1 − s``); with ``start_mode="next_sigma"`` ``s < 1`` always holds.
* :func:`renoise_timesteps` also enforces ``lo ≥ 0`` and ``hi ≤ N − 1`` (the reference
  computes ``lo = max(0, …)``, ``hi = min(…, N − 1)`` at the call site).
* The rank-0 broadcasts of the reference (τ in stage 1, CFG scale) are the caller's job: every
  function takes an optional ``generator`` and returns plain tensors.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from .cps import SigmaLike, _compute_dtype, _sigma_tensor, cps_step, validate_eta
from .dmd import dmd_loss

__all__ = [
    "subinterval_coefficients",
    "subinterval_forward",
    "subinterval_target",
    "subinterval_forward_target",
    "renoise_timesteps",
    "inverse_scale_weight",
    "ac_fake_loss",
    "back_project",
    "ac_generator_pair",
    "ac_generator_loss",
    "subinterval_start",
]

SIGMA_TS_FLOOR = 1e-12  # floor on σ_ts² (§5.3)
SCALE_SQ_FLOOR = 1e-12  # floor on scale² in the inverse-scale weight (§5.5)


def subinterval_coefficients(
    sigma_start: torch.Tensor, sigma_end: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, σ_ts)`` of the sub-interval kernel ``s → t`` (elementwise on tensors)."""
    s, t = sigma_start, sigma_end
    a = (1.0 - t) / (1.0 - s)
    sigma_ts = torch.sqrt(torch.clamp(t * t - a * a * s * s, min=SIGMA_TS_FLOOR))
    return a, sigma_ts


def _prep(x_start, noise, sigma_start, sigma_end):
    if noise.shape != x_start.shape:
        raise ValueError(
            f"noise shape {tuple(noise.shape)} does not match x_start shape {tuple(x_start.shape)}"
        )
    dtype = _compute_dtype(x_start, noise)
    x = x_start.to(dtype)
    z = noise.to(device=x.device, dtype=dtype)
    s = _sigma_tensor(sigma_start, x, dtype, "sigma_start")
    t = _sigma_tensor(sigma_end, x, dtype, "sigma_end")
    return x, z, s, t


def subinterval_forward(
    x_start: torch.Tensor,
    noise: torch.Tensor,
    sigma_start: SigmaLike,
    sigma_end: SigmaLike,
) -> torch.Tensor:
    """``x_t = a·x_s + σ_ts·z`` (§5.3), returned in ``x_start.dtype``; sigmas scalar or ``[B]``."""
    x, z, s, t = _prep(x_start, noise, sigma_start, sigma_end)
    a, sigma_ts = subinterval_coefficients(s, t)
    return (a * x + sigma_ts * z).to(x_start.dtype)


def subinterval_target(
    x_start: torch.Tensor,
    noise: torch.Tensor,
    sigma_start: SigmaLike,
    sigma_end: SigmaLike,
    move_scale_out: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AC regression target ``(T', scale)`` of §5.4 in the compute dtype.

    ``T = −x_s/(1 − s) + [(t + (1 − t)s²/(1 − s)²)/σ_ts]·z``; with ``move_scale_out``
    ``T' = σ_ts·T`` and ``scale = σ_ts`` (``[B,1,…]`` or ``[1,…]``), else ``T' = T``,
    ``scale = 1``. The target is a plain differentiable function of its inputs (nothing is
    detached here); :func:`ac_fake_loss` detaches it.
    """
    x, z, s, t = _prep(x_start, noise, sigma_start, sigma_end)
    _, sigma_ts = subinterval_coefficients(s, t)
    return _target(x, z, s, t, sigma_ts, move_scale_out)


def _target(x, z, s, t, sigma_ts, move_scale_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    one_m_s = 1.0 - s
    coef_z = (t + (1.0 - t) * s * s / (one_m_s * one_m_s)) / sigma_ts
    target = -x / one_m_s + coef_z * z
    if move_scale_out:
        return sigma_ts * target, sigma_ts
    return target, torch.ones_like(sigma_ts)


def subinterval_forward_target(
    x_start: torch.Tensor,
    noise: torch.Tensor,
    sigma_start: SigmaLike,
    sigma_end: SigmaLike,
    move_scale_out: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, T', scale)``: :func:`subinterval_forward` and :func:`subinterval_target` of the
    same ``(x_s, z, s, t)`` (the AC fake-score step needs both), sharing one computation of
    ``(a, σ_ts)`` — the same ops on the same inputs, so the same values."""
    x, z, s, t = _prep(x_start, noise, sigma_start, sigma_end)
    a, sigma_ts = subinterval_coefficients(s, t)
    x_t = (a * x + sigma_ts * z).to(x_start.dtype)
    return (x_t, *_target(x, z, s, t, sigma_ts, move_scale_out))


def _batch_vector(v: SigmaLike, batch: int, device, dtype, name: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        t = v.to(dtype=dtype)
        if device is not None:
            t = t.to(device)
        if t.numel() == 1:
            return t.reshape(1).expand(batch).clone()
        if t.numel() != batch:
            raise ValueError(
                f"{name} must be a scalar or have {batch} values, got shape {tuple(v.shape)}"
            )
        return t.reshape(batch)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a float or a tensor, got {v!r}")
    return torch.full((batch,), float(v), dtype=dtype, device=device)


def renoise_timesteps(
    start_sigma: SigmaLike,
    batch: int,
    *,
    offset: float = 10.0,
    end_timestep: float = 1000.0,
    lo: float = 20.0,
    hi: float = 980.0,
    generator: torch.Generator | None = None,
    num_train_timesteps: int = 1000,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Continuous renoising timesteps ``τ`` (model-timestep units), shape ``[batch]`` (§5.2).

    ``τ ~ U[N·s + offset, end]`` (``end ← start + 1`` if ``end ≤ start``), then clamped to
    ``[max(0, lo), min(hi, N − 1)]``. ``t = τ/N``. float32, on ``start_sigma``'s device
    (or ``device``).
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got batch={batch!r}")
    n = float(num_train_timesteps)
    lo_eff = max(0.0, float(lo))
    hi_eff = min(float(hi), n - 1.0)
    if lo_eff > hi_eff:
        raise ValueError(f"renoise clamp range is empty: lo={lo!r}, hi={hi!r} (N={num_train_timesteps})")
    if device is None and isinstance(start_sigma, torch.Tensor):
        device = start_sigma.device
    s = _batch_vector(start_sigma, batch, device, torch.float32, "start_sigma")
    start = n * s + float(offset)
    end = torch.full_like(start, float(end_timestep))
    end = torch.where(end <= start, start + 1.0, end)
    gen_device = generator.device if generator is not None else s.device
    u = torch.rand((batch,), generator=generator, device=gen_device, dtype=torch.float32).to(s.device)
    tau = start + (end - start) * u
    return torch.clamp(tau, min=lo_eff, max=hi_eff)


def inverse_scale_weight(
    scale: torch.Tensor | float, clamp_min: float = 0.0, clamp_max: float = 10.0
) -> torch.Tensor:
    """``nan_to_num(clamp(1/max(scale², 1e−12), c_min, c_max))`` with nan → 0, +inf → c_max (§5.5)."""
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), dtype=torch.float32)
    if clamp_min > clamp_max:
        raise ValueError(f"clamp_min={clamp_min!r} must be <= clamp_max={clamp_max!r}")
    sc = scale.to(_compute_dtype(scale))
    w = 1.0 / torch.clamp(sc * sc, min=SCALE_SQ_FLOOR)
    w = torch.clamp(w, min=clamp_min, max=clamp_max)
    return torch.nan_to_num(w, nan=0.0, posinf=clamp_max, neginf=clamp_min)


def ac_fake_loss(
    fake_velocity: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor | float,
    clamp_min: float = 0.0,
    clamp_max: float = 10.0,
) -> torch.Tensor:
    """``L_AC = mean[w·(scale·v_φ − T')²]`` (§5.5), scalar in the compute dtype."""
    if fake_velocity.shape != target.shape:
        raise ValueError(
            f"fake_velocity shape {tuple(fake_velocity.shape)} != target shape {tuple(target.shape)}"
        )
    dtype = _compute_dtype(fake_velocity, target)
    v = fake_velocity.to(dtype)
    tgt = target.to(device=v.device, dtype=dtype).detach()
    if isinstance(scale, torch.Tensor):
        sc = scale.to(device=v.device, dtype=dtype).detach()
    else:
        sc = torch.tensor(float(scale), dtype=dtype, device=v.device)
    w = inverse_scale_weight(sc, clamp_min, clamp_max)
    return torch.mean(w * (sc * v - tgt) ** 2)


def back_project(
    x_t: torch.Tensor,
    velocity: torch.Tensor,
    t: SigmaLike,
    s: SigmaLike,
    eta: float,
    noise: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """CPS transition ``t → s`` of §5.6 (per-sample sigmas, external noise); = :func:`cps_step`."""
    return cps_step(x_t, velocity, t, s, eta, noise, generator=generator)


def ac_generator_pair(
    x_t: torch.Tensor,
    real_velocity: torch.Tensor,
    fake_velocity: torch.Tensor,
    t: SigmaLike,
    s: SigmaLike,
    eta: float,
    noise: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_r, x_f)``: back-projections of teacher and fake velocities with one shared noise ξ'.

    A single ``ξ'`` is drawn (unless given) and used for both; none is drawn if η = 0 or every
    ``s`` is 0. Outputs are detached (both networks are evaluated without grad in §5.6).
    """
    eta = validate_eta(eta)
    if noise is None and eta > 0.0:
        s_all_zero = (
            bool((s == 0).all()) if isinstance(s, torch.Tensor) else float(s) == 0.0
        )
        if not s_all_zero:
            dtype = _compute_dtype(x_t, real_velocity, fake_velocity)
            gen_device = generator.device if generator is not None else x_t.device
            noise = torch.randn(
                x_t.shape, dtype=dtype, device=gen_device, generator=generator
            ).to(x_t.device)
    with torch.no_grad():
        x_r = back_project(x_t.detach(), real_velocity.detach(), t, s, eta, noise)
        x_f = back_project(x_t.detach(), fake_velocity.detach(), t, s, eta, noise)
    return x_r, x_f


def ac_generator_loss(
    x_start: torch.Tensor,
    x_t: torch.Tensor,
    real_velocity: torch.Tensor,
    fake_velocity: torch.Tensor,
    t: SigmaLike,
    s: SigmaLike,
    eta: float,
    noise: torch.Tensor | None = None,
    *,
    normalize: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """AC-DMD generator loss ``L_DM(x_s, x_f, x_r)`` (§5.6) → ``(loss, metrics)``."""
    x_r, x_f = ac_generator_pair(
        x_t, real_velocity, fake_velocity, t, s, eta, noise, generator=generator
    )
    return dmd_loss(x_start, x_f, x_r, normalize=normalize)


def subinterval_start(
    mode: str,
    *,
    sigma_current: SigmaLike,
    sigma_next: SigmaLike,
    x_next: torch.Tensor | None = None,
    x_in: torch.Tensor | None = None,
    velocity: torch.Tensor | None = None,
    eta: float | None = None,
    boundary_sigma: float | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-interval start ``(x_s, s)`` of §5.1; ``s`` is a ``[B]`` tensor in [0, 1] (float32, or
    float64 for float64 samples).

    * ``"next_sigma"``: ``s = σ_n``, ``x_s = x_next`` (keeps its graph).
    * ``"fixed_boundary"``: ``s = min(σ_c, boundary_sigma)``,
      ``x_s = CPS(x_in, velocity, σ_c → s, η, noise)`` (fresh noise if ``noise`` is None).
      The caller resolves the boundary (``σ_list[clamped index]`` in stage 1,
      ``ac_fixed_boundary_sigma`` in stage 2).
    """
    if mode == "next_sigma":
        if x_next is None:
            raise ValueError("start_mode 'next_sigma' needs x_next")
        batch = x_next.shape[0]
        dt = _compute_dtype(x_next)
        s = _batch_vector(sigma_next, batch, x_next.device, dt, "sigma_next")
        return x_next, torch.clamp(s, 0.0, 1.0)
    if mode == "fixed_boundary":
        if x_in is None or velocity is None or eta is None or boundary_sigma is None:
            raise ValueError(
                "start_mode 'fixed_boundary' needs x_in, velocity, eta and boundary_sigma"
            )
        batch = x_in.shape[0]
        dt = _compute_dtype(x_in, velocity)
        sc = _batch_vector(sigma_current, batch, x_in.device, dt, "sigma_current")
        s = torch.clamp(torch.clamp(sc, max=float(boundary_sigma)), 0.0, 1.0)
        x_s = cps_step(x_in, velocity, sc, s, eta, noise, generator=generator)
        return x_s, s
    raise ValueError(f"start_mode must be 'next_sigma' or 'fixed_boundary', got {mode!r}")
