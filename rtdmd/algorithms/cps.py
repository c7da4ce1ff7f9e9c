r"""CPS sampler step and transition log-probabilities (spec §2).

Notation (§1.1): ``x`` at noise level ``σ``, velocity ``v = ε − x0``, target level ``σ' < σ``,
stochasticity ``η ∈ [0, 1]``, ``θ = η·π/2``::

    x̂0 = x − σ·v                    (data estimate)
    ε̂  = x + (1 − σ)·v              (noise estimate)

    deterministic (η = 0 or σ' = 0):  x' = x + (σ' − σ)·v          (Euler = (1−σ')x̂0 + σ'ε̂)
    stochastic:                       μ  = (1 − σ')·x̂0 + σ'·cos θ·ε̂
                                      ρ  = σ'·sin θ
                                      x' = μ + ρ·ξ,  ξ ~ N(0, I)

Simplified GRPO log-probability (§2.2, used by every released config)::

    logp = − mean_{C,H,W} (sg(x') − μ)²                  → shape [B]

(no 1/ρ², no normaliser: ``∇_μ logp = 2ρ²·∇_μ mean_D log N(x'; μ, ρ²)``). The exact variant is
``mean_D log N(x'; μ, ρ²)``.

Flow-GRPO ``"sde"`` step (§2.2, not used by released configs; :func:`sde_step_with_log_prob`)::

    std = η·sqrt(σ / (1 − σ̃)),  σ̃ = σ unless σ = 1 (then σ̃ = the schedule's second sigma)
    dt  = σ' − σ
    μ   = x·(1 + std²·dt/(2σ)) + v·(1 + std²·(1 − σ)/(2σ))·dt
    x'  = μ + std·sqrt(−dt)·ξ,   logp = mean_D log N(x'; μ, (std·sqrt(−dt))²)

``σ``/``σ'`` may be python floats, 0-d tensors or per-sample ``[B]`` tensors (broadcast over the
non-batch dims); the per-sample form is the generic "transition" helper of §2.1 used by AC-DMD
back-projections and consistency chains, so the stateful step, the per-sample transition and the
stateless log-prob step are literally the same code path.

Deliberate departures / choices:

* Arithmetic is done in float32 *or wider*: float64 inputs are computed in float64 (the
  reference always uses fp32; this only matters for fp64 tests). Samples are cast back to
  ``velocity.dtype``; means, stds and log-probs are returned in the compute dtype (≥ fp32).
* Exact log-prob (``simplified=False``) where ``ρ = 0`` (the final, deterministic step) is
  defined as 0 for that sample (the Gaussian is degenerate); the simplified log-prob is then
  0 as well when ``x' = μ``.
* No noise is drawn (the RNG is not advanced) when every ``ρ`` is 0.
* In ``"sde"`` mode the returned ``std`` is the full transition std ``std·sqrt(−dt)`` (so that
  ``(μ, std)`` always describe the transition Gaussian), not the bare ``std`` coefficient.
"""

from __future__ import annotations

import math
import numbers
from typing import Union

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

SigmaLike = Union[float, torch.Tensor]

__all__ = [
    "validate_eta",
    "cps_step",
    "cps_mean_std",
    "cps_log_prob",
    "cps_step_with_log_prob",
    "sde_step_with_log_prob",
    "lookup_sigmas",
]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def validate_eta(eta: float | torch.Tensor) -> float:
    """Return ``eta`` as a python float, raising ``ValueError`` unless it lies in [0, 1]."""
    if type(eta) is float and 0.0 <= eta <= 1.0:  # the per-step common case, without the ABC checks
        return eta
    if isinstance(eta, torch.Tensor):
        if eta.numel() != 1:
            raise ValueError(f"eta must be a scalar, got a tensor of shape {tuple(eta.shape)}")
        eta = eta.item()
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
        raise ValueError(f"eta must be a real number in [0, 1], got eta={eta!r}")
    e = float(eta)
    if not (math.isfinite(e) and 0.0 <= e <= 1.0):
        raise ValueError(f"eta must be in [0, 1], got eta={eta!r}")
    return e


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp32 arithmetic as the reference)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _sigma_tensor(sigma: SigmaLike, ref: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Sigma as a tensor broadcastable to ``ref``: ``[1,...,1]`` for scalars, ``[B,1,...,1]``
    for per-sample values (``[B]`` or any shape with ``B`` elements)."""
    nd = ref.dim()
    if isinstance(sigma, torch.Tensor):
        s = sigma.to(device=ref.device, dtype=dtype)
        if s.numel() == 1:
            return s.reshape([1] * max(nd, 1))
        batch = ref.shape[0] if nd > 0 else 1
        if s.numel() != batch:
            raise ValueError(
                f"{name} must be a scalar or have one value per sample (B={batch}), "
                f"got shape {tuple(s.shape)}"
            )
        return s.reshape([batch] + [1] * (nd - 1))
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise ValueError(f"{name} must be a float or a tensor, got {sigma!r}")
    return torch.full([1] * max(nd, 1), float(sigma), dtype=dtype, device=ref.device)


def _mean_nonbatch(t: torch.Tensor) -> torch.Tensor:
    if t.dim() <= 1:
        return t
    return t.reshape(t.shape[0], -1).mean(dim=1)


def _mean_std(sample, velocity, sigma, sigma_next, eta: float):
    """(μ, ρ) in the compute dtype; ``eta`` already validated."""
    mu, rho, _ = _mean_std_z(sample, velocity, sigma, sigma_next, eta)
    return mu, rho


def _is_scalar(sigma) -> bool:
    return type(sigma) is float or (not isinstance(sigma, (bool, torch.Tensor)) and isinstance(sigma, numbers.Real))


def _mean_std_z(sample, velocity, sigma, sigma_next, eta: float):
    """(μ, ρ, ρ ≡ 0 as a bool or None when not known without a device read)."""
    dtype = _compute_dtype(sample, velocity)
    x = sample.to(dtype)
    v = velocity.to(dtype)
    c = _scalar_coeffs(sigma, sigma_next, eta, x) if _is_scalar(sigma) and _is_scalar(sigma_next) else None
    if c is not None:
        if eta == 0.0:
            return x + c.ds * v, c.rho, True
        x0 = x - c.s * v
        if c.final:  # σ' = 0: the deterministic Euler step x̂0
            return x0, c.rho, c.rho_zero
        eps = x + c.one_minus_s * v
        return c.one_minus_sn * x0 + c.sn_cos * eps, c.rho, c.rho_zero
    s = _sigma_tensor(sigma, x, dtype, "sigma")
    s_next = _sigma_tensor(sigma_next, x, dtype, "sigma_next")
    if eta == 0.0:
        mu = x + (s_next - s) * v
        rho = torch.zeros_like(s_next)
        return mu, rho, True
    theta = eta * math.pi / 2.0
    x0 = x - s * v
    eps = x + (1.0 - s) * v
    mu_sto = (1.0 - s_next) * x0 + s_next * math.cos(theta) * eps
    # Per sample: σ' = 0 is the deterministic Euler step (= x̂0), with no noise.
    final = s_next == 0
    mu = torch.where(final, x0, mu_sto)  # x0 is x − s·v
    rho = torch.where(final, torch.zeros_like(s_next), s_next * math.sin(theta))
    return mu, rho, None


class _Coeffs:
    """The ``[1,...,1]`` constants of one transition between python-float sigmas, computed with
    the same tensor ops (so the same fp32 roundings) as the per-call path."""

    __slots__ = ("s", "ds", "one_minus_s", "one_minus_sn", "sn_cos", "rho", "final", "rho_zero")

    def __init__(self, sigma: float, sigma_next: float, eta: float, x: torch.Tensor):
        s = _sigma_tensor(sigma, x, x.dtype, "sigma")
        s_next = _sigma_tensor(sigma_next, x, x.dtype, "sigma_next")
        self.s, self.ds = s, s_next - s
        theta = eta * math.pi / 2.0
        self.one_minus_s, self.one_minus_sn = 1.0 - s, 1.0 - s_next
        self.sn_cos = s_next * math.cos(theta)
        final = s_next == 0
        self.final = bool(final.all())
        if eta == 0.0:
            self.rho = torch.zeros_like(s_next)
        else:
            self.rho = torch.where(final, torch.zeros_like(s_next), s_next * math.sin(theta))
        self.rho_zero = not bool((self.rho != 0).any())


_COEFFS: dict[tuple, _Coeffs] = {}


def _scalar_coeffs(sigma: float, sigma_next: float, eta: float, x: torch.Tensor) -> _Coeffs | None:
    """Memoised :class:`_Coeffs` (a sampler revisits the same few sigma pairs every step).

    ``None`` (use the per-call path) while a dispatch mode (the planner's fake tensors, a memory
    tracker) or a compiler trace is active, so a cached constant is always a plain tensor.
    Cached tensors are shared: callers must not modify the returned ``ρ`` in place."""
    if _get_current_dispatch_mode() is not None or torch.compiler.is_compiling():
        return None
    key = (float(sigma), float(sigma_next), eta, x.dtype, x.device, x.dim())
    c = _COEFFS.get(key)
    if c is not None:
        return c
    with torch.inference_mode(False), torch.no_grad():
        c = _Coeffs(key[0], key[1], eta, x)
    if len(_COEFFS) >= 4096:
        _COEFFS.clear()
    _COEFFS[key] = c
    return c


def _draw_noise(ref: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None):
    if generator is None:
        return torch.randn(ref.shape, dtype=dtype, device=ref.device)
    noise = torch.randn(ref.shape, dtype=dtype, device=generator.device, generator=generator)
    return noise.to(ref.device)


def _apply_noise(mu, rho, noise, generator, rho_zero: bool | None = None):
    """``μ + ρ·ξ`` (no noise drawn if ρ ≡ 0; ``rho_zero`` says so when already known)."""
    if noise is None:
        if rho_zero if rho_zero is not None else not bool((rho != 0).any()):
            return mu, None
        noise = _draw_noise(mu, mu.dtype, generator)
    else:
        if noise.shape != mu.shape:
            raise ValueError(
                f"noise shape {tuple(noise.shape)} does not match sample shape {tuple(mu.shape)}"
            )
        noise = noise.to(device=mu.device, dtype=mu.dtype)
    return mu + rho * noise, noise


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def cps_mean_std(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``μ`` and std ``ρ`` of the CPS transition ``σ → σ'`` (§2.1).

    Returns ``(mu, rho)`` in the compute dtype (≥ fp32); ``mu`` has the sample's shape, ``rho``
    is ``[B,1,...,1]`` for per-sample sigmas and ``[1,...,1]`` otherwise. ``rho = 0`` for η = 0
    and wherever ``σ' = 0``.
    """
    eta = validate_eta(eta)
    return _mean_std(sample, velocity, sigma, sigma_next, eta)


def cps_step(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    eta: float,
    noise: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One CPS transition ``x(σ) → x(σ')`` (§2.1), returned in ``velocity.dtype``.

    Deterministic Euler ``x + (σ' − σ)·v`` when ``η = 0`` or (per sample) ``σ' = 0``;
    otherwise ``μ + ρ·ξ`` with ``ξ = noise`` if given, else fresh ``N(0, I)`` (from
    ``generator`` if given).
    """
    eta = validate_eta(eta)
    mu, rho, zero = _mean_std_z(sample, velocity, sigma, sigma_next, eta)
    out, _ = _apply_noise(mu, rho, noise, generator, zero)
    return out.to(velocity.dtype)


def _log_prob_from(next_sample, mu, rho, simplified: bool, return_unreduced: bool):
    nxt = next_sample.to(mu.dtype)
    if simplified:
        lp = -((nxt.detach() - mu) ** 2)
    else:
        pos = rho > 0
        safe_rho = torch.where(pos, rho, torch.ones_like(rho))
        lp = (
            -((nxt.detach() - mu) ** 2) / (2.0 * safe_rho**2)
            - torch.log(safe_rho)
            - 0.5 * math.log(2.0 * math.pi)
        )
        lp = torch.where(pos, lp, torch.zeros_like(lp))
    if return_unreduced:
        return lp
    return _mean_nonbatch(lp)


def cps_log_prob(
    next_sample: torch.Tensor,
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    eta: float,
    simplified: bool = True,
    *,
    return_unreduced: bool = False,
) -> torch.Tensor:
    """Log-probability of ``next_sample`` under the CPS transition, shape ``[B]`` (§2.2).

    ``simplified=True`` (released configs): ``−mean_D (sg(x') − μ)²``. ``simplified=False``:
    ``mean_D log N(x'; μ, ρ²)`` with normaliser; defined as 0 for samples with ``ρ = 0``
    (final deterministic step). ``next_sample`` is always detached; gradients flow through
    ``μ`` (i.e. ``velocity``). ``return_unreduced=True`` returns the elementwise tensor.
    """
    eta = validate_eta(eta)
    mu, rho = _mean_std(sample, velocity, sigma, sigma_next, eta)
    return _log_prob_from(next_sample, mu, rho, simplified, return_unreduced)


def cps_step_with_log_prob(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    eta: float,
    *,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    simplified: bool = True,
    return_unreduced: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stateless CPS step for GRPO (§2.2, ``sde_type="cps"``) → ``(x', logp, μ, ρ)``.

    If ``prev_sample`` is None, ``x' = μ + ρ·ξ`` (``ξ = noise`` if given, else fresh) and the
    log-prob is evaluated at that ``x'`` (so ``logp = −ρ²·mean(ξ²)`` for the simplified form);
    otherwise ``x' = prev_sample`` and its log-prob is returned. ``x'`` is returned in
    ``velocity.dtype``; ``logp``, ``μ`` and ``ρ`` in the compute dtype.
    """
    eta = validate_eta(eta)
    mu, rho, zero = _mean_std_z(sample, velocity, sigma, sigma_next, eta)
    if prev_sample is None:
        nxt, _ = _apply_noise(mu, rho, noise, generator, zero)
        nxt = nxt.detach()
    else:
        nxt = prev_sample
    logp = _log_prob_from(nxt, mu, rho, simplified, return_unreduced)
    return nxt.to(velocity.dtype), logp, mu, rho


def sde_step_with_log_prob(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    eta: float,
    *,
    sigma_one_replacement: float | None = None,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow-GRPO ``"sde"`` step (§2.2) → ``(x', logp, μ, std·sqrt(−dt))``.

    ``std = η·sqrt(σ/(1 − σ̃))`` where ``σ̃ = σ`` except that ``σ = 1`` is replaced by
    ``sigma_one_replacement`` (the schedule's second sigma; required if any ``σ = 1``).
    ``logp = mean_D log N(x'; μ, (std·sqrt(−dt))²)`` (exact Gaussian). Undefined for η = 0 and
    for ``σ' ≥ σ``.
    """
    eta = validate_eta(eta)
    if eta == 0.0:
        raise ValueError("eta must be > 0 for the 'sde' step (its log-prob is undefined), got eta=0")
    dtype = _compute_dtype(sample, velocity)
    x = sample.to(dtype)
    v = velocity.to(dtype)
    s = _sigma_tensor(sigma, x, dtype, "sigma")
    s_next = _sigma_tensor(sigma_next, x, dtype, "sigma_next")
    is_one = s == 1.0
    if bool(is_one.any()):
        if sigma_one_replacement is None:
            raise ValueError("sigma == 1 needs sigma_one_replacement (the schedule's second sigma)")
        s_tilde = torch.where(is_one, torch.full_like(s, float(sigma_one_replacement)), s)
    else:
        s_tilde = s
    std = eta * torch.sqrt(s / (1.0 - s_tilde))
    dt = s_next - s
    if bool((dt >= 0).any()):
        raise ValueError("sde step needs sigma_next < sigma for every sample")
    mu = x * (1.0 + std**2 * dt / (2.0 * s)) + v * (1.0 + std**2 * (1.0 - s) / (2.0 * s)) * dt
    scale = std * torch.sqrt(-dt)
    if prev_sample is None:
        nxt, _ = _apply_noise(mu, scale, noise, generator)
        nxt = nxt.detach()
    else:
        nxt = prev_sample.to(dtype)
    lp = (
        -((nxt.detach() - mu) ** 2) / (2.0 * scale**2)
        - torch.log(scale)
        - 0.5 * math.log(2.0 * math.pi)
    )
    return nxt.to(velocity.dtype), _mean_nonbatch(lp), mu, scale


def lookup_sigmas(
    timestep: torch.Tensor,
    schedule_timesteps: torch.Tensor,
    schedule_sigmas: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(σ, σ')`` by *exact equality* of ``timestep`` against the schedule (§2.2).

    ``schedule_timesteps`` has K entries ``N·σ_i``; ``schedule_sigmas`` has K + 1 entries
    (terminal 0 included). Raises ``ValueError`` if a timestep is not in the schedule, so store
    and reuse the exact fp32 timestep values.
    """
    t = timestep.reshape(-1, 1).to(schedule_timesteps.dtype)
    ts = schedule_timesteps.reshape(1, -1).to(t.device)
    if schedule_sigmas.numel() != ts.shape[1] + 1:
        raise ValueError(
            f"schedule_sigmas must have len(schedule_timesteps) + 1 = {ts.shape[1] + 1} entries, "
            f"got {schedule_sigmas.numel()}"
        )
    match = t == ts
    found = match.any(dim=1)
    if not bool(found.all()):
        bad = timestep.reshape(-1)[~found.to(timestep.device)].tolist()
        raise ValueError(f"timestep(s) {bad} not found in the schedule timesteps")
    idx = match.to(torch.int64).argmax(dim=1)
    sig = schedule_sigmas.reshape(-1).to(t.device)
    return sig[idx], sig[idx + 1]
