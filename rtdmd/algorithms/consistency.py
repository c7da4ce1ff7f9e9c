r"""Consistency (martingale) regulariser on the fake denoiser (spec §5.7).

With fake velocity ``v_φ(x, τ)`` and denoiser ``h(x, τ) = x − (τ/N)·v_φ(x, τ)``:

1. anchor ``h_a = x_t − t·v_φ(x_t, τ)``  (``t = τ/N``; the anchor forward keeps its graph);
2. chain from ``(x_t, τ_0 = τ)``: for ``k = 0..n−1``
   ``δ_k ~ UniformInt{1..max(1, round(ε_τ))}`` per sample, ``τ_{k+1} = max(τ_k − δ_k, 0)``,
   ``x_{k+1} = CPS(x_k, v_k, τ_k/N → τ_{k+1}/N, η, fresh ξ)`` with ``v_0 = sg(v_φ(x_t, τ))``
   (reuse of the anchor forward) and ``v_k = v_φ(x_k, τ_k)`` for ``k ≥ 1``; with
   ``stopgrad_transitions`` the chain runs without autograd;
3. two-sample mode: a second chain with the same ``τ`` sequence and independent noise;
   ``h'_i = x'_i − t'·v_φ(x'_i, τ_n)`` (with grad), ``t' = τ_n/N``;
4. ``L_cons = mean_B mean_D [(h'_1 − h_a)·(h'_2 − h_a)]`` — an unbiased estimate of
   ``‖E[h' | x_t] − h_a‖²`` — or, one-sample, ``mean((h'_1 − h_a)²)``; non-finite → 0.
   Where ``t' = 0`` the transition is deterministic and ``h' = x'``.
5. The caller adds ``γ·L_cons`` to ``L_AC`` (γ = 0.01).

Deliberate choices:

* ``h' = x'`` is enforced explicitly where ``t' = 0`` (``torch.where``), and the final fake
  forward is skipped when ``t' = 0`` for every sample, so a network that is singular at
  ``τ = 0`` cannot poison the loss.
* The two chains' final forwards are separate calls of ``fake_velocity`` on ``B`` samples each
  (no ``2B`` concatenation), so the callable may close over batch-``B`` conditioning.
* ``deltas`` may be passed (``[num_moves, B]`` integers) so that a distributed caller can
  broadcast them from rank 0 (stage 1); otherwise they are drawn from ``generator``.
* A non-finite loss is replaced by a constant 0 without graph (no gradient from this term).
* Arithmetic for ``h`` and the loss is float32 or wider (float64 inputs stay float64).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch

from .ac_dmd import _batch_vector
from .cps import _compute_dtype, cps_step, validate_eta

__all__ = ["draw_consistency_deltas", "consistency_loss"]

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def draw_consistency_deltas(
    batch: int,
    num_moves: int,
    eps_timestep: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``δ ~ UniformInt{1..max(1, round(ε_τ))}``, int64 of shape ``[num_moves, batch]``."""
    if isinstance(num_moves, bool) or not isinstance(num_moves, int) or num_moves < 1:
        raise ValueError(f"num_moves must be a positive int, got num_moves={num_moves!r}")
    if not float(eps_timestep) >= 0.0:
        raise ValueError(f"eps_timestep must be >= 0, got eps_timestep={eps_timestep!r}")
    hi = max(1, int(round(float(eps_timestep))))
    gen_device = generator.device if generator is not None else (device or "cpu")
    d = torch.randint(1, hi + 1, (num_moves, batch), generator=generator, device=gen_device)
    return d.to(device) if device is not None else d


def consistency_loss(
    fake_velocity: VelocityFn,
    anchor_velocity: torch.Tensor,
    x_t: torch.Tensor,
    tau: torch.Tensor | float,
    *,
    eta: float,
    eps_timestep: float = 200.0,
    num_moves: int = 1,
    two_sample: bool = True,
    stopgrad_transitions: bool = True,
    generator: torch.Generator | None = None,
    deltas: torch.Tensor | None = None,
    num_train_timesteps: int = 1000,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Consistency regulariser ``L_cons`` of §5.7 → ``(loss, metrics)``.

    Args:
        fake_velocity: ``f(x, timestep) -> v`` with ``timestep`` a ``[B]`` tensor in
            model-timestep units (``0..N``; float32, float64 for float64 inputs); must return a
            tensor of ``x``'s shape.
        anchor_velocity: ``v_φ(x_t, τ)`` from the §5.5 forward, *with* its graph.
        x_t: the renoised sample at ``t = τ/N``.
        tau: renoising timesteps ``[B]`` (or a scalar), model-timestep units.
        eta: CPS stochasticity of the chain transitions.
        eps_timestep, num_moves: ``ε_τ`` and ``n``.
        two_sample: product estimator (True) or one-sample MSE (False).
        stopgrad_transitions: run the chain under ``torch.no_grad()``.
        generator: RNG for the deltas and the chain noise.
        deltas: optional precomputed ``[num_moves, B]`` integer decrements.

    Returns:
        ``loss`` (0-d, compute dtype) and metrics ``{"cons/loss", "cons/final_tau_mean",
        "cons/nonfinite"}`` (python floats).
    """
    eta = validate_eta(eta)
    if x_t.dim() < 1:
        raise ValueError("x_t must have a batch dimension")
    if anchor_velocity.shape != x_t.shape:
        raise ValueError(
            f"anchor_velocity shape {tuple(anchor_velocity.shape)} != x_t shape {tuple(x_t.shape)}"
        )
    batch = x_t.shape[0]
    device = x_t.device
    n_train = float(num_train_timesteps)
    if deltas is None:
        deltas = draw_consistency_deltas(
            batch, num_moves, eps_timestep, generator=generator, device=device
        )
    else:
        if tuple(deltas.shape) != (num_moves, batch):
            raise ValueError(
                f"deltas must have shape (num_moves, B) = ({num_moves}, {batch}), "
                f"got {tuple(deltas.shape)}"
            )
        deltas = deltas.to(device)

    dtype = _compute_dtype(x_t, anchor_velocity)
    bshape = [batch] + [1] * (x_t.dim() - 1)
    tau0 = _batch_vector(tau, batch, device, dtype, "tau")
    taus = [tau0]
    for k in range(num_moves):
        taus.append(torch.clamp(taus[-1] - deltas[k].to(dtype), min=0.0))
    tau_final = taus[-1]
    ts = [tau_k / n_train for tau_k in taus]  # t = τ/N, shared by h and both chains (the same values)

    def _h(x: torch.Tensor, v: torch.Tensor, k: int) -> torch.Tensor:
        return x.to(dtype) - ts[k].reshape(bshape) * v.to(dtype)

    h_anchor = _h(x_t, anchor_velocity, 0)

    def _chain() -> torch.Tensor:
        ctx = torch.no_grad() if stopgrad_transitions else contextlib.nullcontext()
        with ctx:
            x = x_t.detach() if stopgrad_transitions else x_t
            v = anchor_velocity.detach()
            for k in range(num_moves):
                x = cps_step(x, v, ts[k], ts[k + 1], eta, generator=generator)
                if k + 1 < num_moves:
                    v = fake_velocity(x, taus[k + 1])
        return x

    t_final_zero = tau_final == 0
    n_zero = int(t_final_zero.sum())  # one read: "all at τ = 0" and "none at τ = 0"

    def _final_h(x_end: torch.Tensor) -> torch.Tensor:
        if n_zero == batch:
            return x_end.to(dtype)
        v_end = fake_velocity(x_end, tau_final)
        h = _h(x_end, v_end, num_moves)
        if n_zero == 0:  # the where() below would return h unchanged (and pass its gradient through)
            return h
        return torch.where(t_final_zero.reshape(bshape), x_end.to(dtype), h)

    h1 = _final_h(_chain())
    if two_sample:
        h2 = _final_h(_chain())
        loss = torch.mean((h1 - h_anchor) * (h2 - h_anchor))
    else:
        loss = torch.mean((h1 - h_anchor) ** 2)

    value = float(loss.detach())  # one read: the finiteness check and the logged value
    finite = math.isfinite(value)
    if not finite:
        loss = torch.zeros((), dtype=dtype, device=device)
    metrics = {
        "cons/loss": value if finite else 0.0,
        "cons/final_tau_mean": float(tau_final.mean().item()),
        "cons/nonfinite": 0.0 if finite else 1.0,
    }
    return loss, metrics
