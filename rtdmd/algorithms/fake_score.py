r"""The AC-DMD fake-score step both stages use (§5.2–§5.5, §5.7, §7.4).

Given a sub-interval start ``(x_s, s)`` (stage 1: the rollout's, §5.1; stage 2: the aux step's
``x_{j+1}`` with ``s = σ_{j+1}``), a renoising timestep ``τ`` and fresh noise ``z``::

    t   = τ / N                                        N = N_TRAIN = 1000 (§1.2)
    x_t = a·x_s + σ_ts·z                               (§5.3)
    T'  = σ_ts·T (move_scale_out) or T                 (§5.4)
    L_AC = mean[w·(scale·v_φ(x_t, τ) − T')²],  w = clamp(1/scale², lo, hi)   (§5.5)
    + γ·L_cons(v_φ; x_t, τ)                            (§5.7, when enabled)

``τ`` is drawn by :func:`draw_renoise`: ``τ ~ U[N·s + offset, end]`` clamped to
``[max(0, min_renoise_step, dmd.min_step), min(max_renoise_step, dmd.max_step, N − 1)]`` — one
clamp rule for both stages (§5.2; §12.8 the point mass at the upper bound is kept). Which random
stream ``τ``, ``z`` and the consistency draws come from is the caller's choice.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from rtdmd.algorithms.ac_dmd import ac_fake_loss, renoise_timesteps, subinterval_forward_target
from rtdmd.algorithms.consistency import consistency_loss

__all__ = ["N_TRAIN", "renoise_bounds", "draw_renoise", "consistency_term", "ac_fake_score_terms"]

N_TRAIN = 1000  # model-timestep units per unit sigma: t = τ / N_TRAIN (§1.2)

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t in [0, 1]) -> v_φ


def renoise_bounds(ac, dmd) -> tuple[float, float]:
    """The §5.2 clamp range ``(lo, hi)`` from the ``ac_dmd`` and ``dmd`` params sections."""
    lo = max(0.0, float(ac.min_renoise_step), float(dmd.min_step))
    hi = min(float(ac.max_renoise_step), float(dmd.max_step), N_TRAIN - 1.0)
    return lo, hi


def draw_renoise(s, batch: int, ac, dmd, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """``[batch]`` renoising timesteps ``τ`` for start sigma ``s`` (§5.2, clamp of :func:`renoise_bounds`)."""
    lo, hi = renoise_bounds(ac, dmd)
    return renoise_timesteps(s, batch, offset=ac.offset, end_timestep=ac.end_timestep, lo=lo, hi=hi,
                             generator=generator, num_train_timesteps=N_TRAIN, device=device)


def consistency_term(velocity: Velocity, v: torch.Tensor, x_t: torch.Tensor, tau: torch.Tensor, cc, eta: float, *,
                     deltas: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """``L_cons`` (§5.7) of the fake velocity ``v`` at ``(x_t, τ)``; ``cc`` the ``consistency`` section."""
    return consistency_loss(lambda x, tau_: velocity(x, tau_ / N_TRAIN), v, x_t, tau, eta=eta,
                            eps_timestep=cc.eps_timestep, num_moves=cc.num_moves, two_sample=cc.two_sample,
                            stopgrad_transitions=cc.stopgrad_transitions, deltas=deltas, generator=generator,
                            num_train_timesteps=N_TRAIN)


def ac_fake_score_terms(velocity: Velocity, x_s: torch.Tensor, s, tau: torch.Tensor, z: torch.Tensor, ac, *,
                        eta: float, cc=None, deltas: torch.Tensor | None = None,
                        generator: torch.Generator | None = None):
    """One AC fake-score evaluation: ``(terms, weights, metrics, (v, x_t))``.

    ``terms["fake/ac"]`` is ``L_AC``; with ``cc`` (the ``consistency`` section, enabled) also
    ``terms["fake/consistency"]`` with ``weights["fake/consistency"] = cc.weight``. The loss to
    minimise is ``Σ weights.get(k, 1)·terms[k]``.
    """
    t = tau / N_TRAIN
    x_t, target, scale = subinterval_forward_target(x_s, z, s, t, ac.move_scale_out)
    v = velocity(x_t, t)
    terms = {"fake/ac": ac_fake_loss(v, target, scale, *ac.weight_clamp)}
    weights: dict[str, float] = {}
    metrics: dict[str, Any] = {}
    if cc is not None:
        terms["fake/consistency"], metrics = consistency_term(velocity, v, x_t, tau, cc, eta, deltas=deltas,
                                                              generator=generator)
        weights["fake/consistency"] = cc.weight
    return terms, weights, metrics, (v, x_t)
