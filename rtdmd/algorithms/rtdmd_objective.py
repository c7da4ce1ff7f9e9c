"""Bookkeeping for the total stage-2 (RTDMD) generator objective (algorithm.md §7.1, §7.2, §7.5).

Equation implemented (per epoch, §7.5)::

    L = (1 / G_eff) * sum_{sub-batches} sum_{j in all_steps}
            ( [j in PPO] * L_PPO,j  +  [j in aux] * (w_dm * L_dm,j + L_bp,j) )

    G_eff     = grpo.gradient_accumulation_steps * |all_steps|
    all_steps = sorted(PPO_steps  U  aux_steps)
    aux_steps = last_step_loss.train_steps resolved against K   ([-1] -> {K-1})

One ``backward(loss_j / G_eff)`` per (sub-batch, step); one optimizer step every ``G_eff``
backward calls.  A step in both sets gets both losses from one shared generator forward.
BP is applied on an aux step only if ``sigma_{j+1} == 0`` when ``bp_only_deterministic``.

How the loss weights map to the paper's beta
--------------------------------------------
The paper minimises ``KL(p_theta || p_teacher * exp(beta r) / Z)``, whose gradient is
``grad KL(p_theta || p_teacher) - beta * grad E_{p_theta}[r]`` (§7.1).  ``beta`` is **not** a
config key; it is implied by the relative loss weights.  Dividing the per-step objective by the
distribution-matching weight ``w_dm`` (``last_step_loss.weight`` = 0.001) puts the DM term at
unit weight and exposes two reward coefficients:

* **BP branch (pathwise, last deterministic step).**  While the hinge is active
  (``R_w < margin``, always true in the released configs)::

      grad (L_bp / w_dm) = -(bp_grad_scale / w_dm) * grad mean_B R_w
      =>  beta_bp = bp_grad_scale / w_dm = 1e-4 / 1e-3 = 0.1      (``implied_bp_beta``)

  in units of the weighted reward sum ``R_w = sum_k w_k R_k``.

* **PPO branch (score function, stochastic steps).**  At ``ratio = 1`` (one optimizer step per
  epoch, §6.5) ``grad L_PPO = -mean_B A * grad logp``.  The reference log-prob is the simplified
  ``-mean_D (x' - mu)^2`` whose gradient equals ``2 rho_j^2 / D`` times that of the exact
  Gaussian log-density summed over the ``D`` latent elements (§2.2, invariant 8), and
  ``A ~ (r - mean_group) / std(r)``.  Hence, per PPO step ``j``::

      beta_ppo,j ~= 2 rho_j^2 / (D * std(r) * w_dm)               (``implied_ppo_beta``)

  e.g. SD3.5-M at 512 px (D = 16*64*64, rho_0 = 0.8889, w_dm = 1e-3): ~0.024 / std(r).
  It varies with the step (through ``rho_j``), with resolution (``D``) and with the batch
  reward spread (advantage normalisation), so the paper's single beta is only an
  order-of-magnitude summary of the reference's weights.

* The DM term itself is not the KL gradient in absolute units: the DMD surrogate normalises the
  per-sample gradient by ``mean_D |x - x_real|`` (§4.1), so "unit weight on DM" means unit weight
  on a *normalised* KL gradient.  Both betas above are relative to that.
* ``grpo.beta`` is the unrelated KL-to-reference-policy coefficient (0 in every config) and
  ``G_eff`` scales every term equally (it does not change any ratio).

Reference behaviours that change the effective weights (§12): bf16 master weights round small
updates away (§12.1); the 1e-5 clip band with one optimizer step per epoch makes the PPO term a
plain group-baseline policy gradient (§12.5); the multi-scorer's "mean" reward is a weighted sum
(§12.10), which is what ``R_w`` above denotes.

Deliberate departures from the reference: none in the arithmetic.  ``resolve_aux_steps`` rejects
out-of-range steps and duplicates are merged (the reference would index out of range).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = [
    "resolve_aux_steps",
    "all_train_steps",
    "grad_accum_divisor",
    "step_loss_terms",
    "should_step_optimizer",
    "bp_applies",
    "combine_step_loss",
    "implied_bp_beta",
    "implied_ppo_beta",
]


def resolve_aux_steps(train_steps: Iterable[int], num_sampler_steps: int) -> list[int]:
    """Resolve ``last_step_loss.train_steps`` against ``K`` (python-style negatives; sorted, unique)."""
    k = int(num_sampler_steps)
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")
    out = set()
    for j in train_steps:
        j = int(j)
        r = j + k if j < 0 else j
        if not 0 <= r < k:
            raise ValueError(f"aux step {j} is out of range for K={k}")
        out.add(r)
    return sorted(out)


def all_train_steps(ppo_steps: Iterable[int], aux_steps: Iterable[int]) -> list[int]:
    """``sorted(PPO_steps U aux_steps)``."""
    return sorted({int(j) for j in ppo_steps} | {int(j) for j in aux_steps})


def grad_accum_divisor(grad_accum: int, n_steps: int) -> int:
    """``G_eff = gradient_accumulation_steps * |all_steps|``."""
    if grad_accum < 1 or n_steps < 1:
        raise ValueError(f"grad_accum ({grad_accum}) and n_steps ({n_steps}) must be >= 1")
    return int(grad_accum) * int(n_steps)


def step_loss_terms(j: int, ppo_steps: Iterable[int], aux_steps: Iterable[int]) -> tuple[bool, bool]:
    """``(j in PPO, j in aux)``."""
    return j in set(ppo_steps), j in set(aux_steps)


def should_step_optimizer(num_backward: int, g_eff: int) -> bool:
    """True after every ``g_eff``-th backward call (``num_backward`` counts from 1)."""
    if num_backward < 1 or g_eff < 1:
        raise ValueError("num_backward and g_eff must be >= 1")
    return num_backward % g_eff == 0


def bp_applies(sigma_next: float, bp_only_deterministic: bool = True) -> bool:
    """BP on an aux step requires ``sigma_{j+1} == 0`` when ``bp_only_deterministic``."""
    return (not bp_only_deterministic) or float(sigma_next) == 0.0


def combine_step_loss(
    *,
    ppo: torch.Tensor | None = None,
    dm: torch.Tensor | None = None,
    bp: torch.Tensor | None = None,
    dm_weight: float = 0.0,
) -> torch.Tensor:
    """``ppo + dm_weight * dm + bp`` over the terms present for this step (un-divided by G_eff)."""
    terms = []
    if ppo is not None:
        terms.append(ppo)
    if dm is not None:
        terms.append(dm * float(dm_weight))
    if bp is not None:
        terms.append(bp)
    if not terms:
        raise ValueError("a training step needs at least one loss term")
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def implied_bp_beta(bp_grad_scale: float, dm_weight: float) -> float:
    """Reward-tilt coefficient of the BP branch relative to the DM term: ``bp_grad_scale / w_dm``."""
    if dm_weight <= 0:
        raise ValueError("dm_weight must be > 0 for beta to be defined")
    return float(bp_grad_scale) / float(dm_weight)


def implied_ppo_beta(rho: float, latent_numel: int, reward_std: float, dm_weight: float) -> float:
    """Approximate PPO-branch beta at one step: ``2 rho^2 / (D * std(r) * w_dm)``."""
    if dm_weight <= 0 or reward_std <= 0 or latent_numel < 1:
        raise ValueError("dm_weight, reward_std must be > 0 and latent_numel >= 1")
    return 2.0 * float(rho) ** 2 / (latent_numel * float(reward_std) * float(dm_weight))
