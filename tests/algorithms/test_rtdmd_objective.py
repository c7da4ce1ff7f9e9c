"""Tests for rtdmd.algorithms.rtdmd_objective (algorithm.md §7.1, §7.2, §7.5)."""

from __future__ import annotations

import pytest
import torch

from rtdmd.algorithms.rtdmd_objective import (
    all_train_steps,
    bp_applies,
    combine_step_loss,
    grad_accum_divisor,
    implied_bp_beta,
    implied_ppo_beta,
    resolve_aux_steps,
    should_step_optimizer,
    step_loss_terms,
)


def test_resolve_aux_steps():
    assert resolve_aux_steps([-1], 4) == [3]
    assert resolve_aux_steps([0, -1], 4) == [0, 3]
    assert resolve_aux_steps([3, -1], 4) == [3]  # duplicates merge
    assert resolve_aux_steps([-4], 4) == [0]
    for bad in ([4], [-5]):
        with pytest.raises(ValueError):
            resolve_aux_steps(bad, 4)
    with pytest.raises(ValueError):
        resolve_aux_steps([-1], 0)


def test_all_train_steps_and_terms():
    ppo, aux = [0, 2], resolve_aux_steps([-1], 4)
    steps = all_train_steps(ppo, aux)
    assert steps == [0, 2, 3]
    assert [step_loss_terms(j, ppo, aux) for j in steps] == [(True, False), (True, False), (False, True)]
    # A step in both sets gets both losses.
    assert all_train_steps([1, 3], [3]) == [1, 3]
    assert step_loss_terms(3, [1, 3], [3]) == (True, True)


def test_grad_accum_and_one_optimizer_step_per_epoch():
    nb = 16
    steps = all_train_steps([0, 2], [3])
    g_eff = grad_accum_divisor(nb, len(steps))
    assert g_eff == 48
    stepped = [n for n in range(1, nb * len(steps) + 1) if should_step_optimizer(n, g_eff)]
    assert stepped == [48]
    with pytest.raises(ValueError):
        grad_accum_divisor(0, 3)
    with pytest.raises(ValueError):
        should_step_optimizer(0, 3)


def test_bp_applies_only_on_deterministic_step():
    assert bp_applies(0.0, True)
    assert not bp_applies(0.5, True)
    assert bp_applies(0.5, False)


def test_combine_step_loss():
    ppo, dm, bp = torch.tensor(0.5), torch.tensor(2.0), torch.tensor(0.1)
    assert combine_step_loss(ppo=ppo).item() == pytest.approx(0.5)
    assert combine_step_loss(dm=dm, bp=bp, dm_weight=1e-3).item() == pytest.approx(0.102)
    assert combine_step_loss(ppo=ppo, dm=dm, bp=bp, dm_weight=1e-3).item() == pytest.approx(0.602)
    with pytest.raises(ValueError):
        combine_step_loss(dm_weight=1.0)


def test_accumulated_backward_equals_total_objective_gradient():
    """sum over (sub-batch, step) of backward(loss / G_eff) == grad of the §7.5 total."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    feats = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)  # [sub-batch, step, dim]
    ppo, aux = [0, 2], [3]
    steps = all_train_steps(ppo, aux)
    g_eff = grad_accum_divisor(2, len(steps))
    w_dm = 1e-3

    def terms(b, j):
        x = feats[b, j] @ theta
        is_ppo, is_aux = step_loss_terms(j, ppo, aux)
        return combine_step_loss(
            ppo=-x if is_ppo else None,
            dm=x**2 if is_aux else None,
            bp=1e-4 * torch.relu(3.0 - x) if is_aux else None,
            dm_weight=w_dm,
        )

    n_back = 0
    for b in range(2):
        for j in steps:
            (terms(b, j) / g_eff).backward()
            n_back += 1
    accumulated = theta.grad.clone()
    assert should_step_optimizer(n_back, g_eff)

    theta.grad = None
    total = sum(terms(b, j) for b in range(2) for j in steps) / g_eff
    total.backward()
    torch.testing.assert_close(accumulated, theta.grad, rtol=1e-12, atol=1e-15)


def test_implied_betas():
    assert implied_bp_beta(1e-4, 1e-3) == pytest.approx(0.1)
    # SD3.5-M at 512 px: D = 16*64*64, rho_0 = 0.8889, w_dm = 1e-3.
    beta = implied_ppo_beta(0.8889, 16 * 64 * 64, 1.0, 1e-3)
    assert beta == pytest.approx(2 * 0.8889**2 / 65.536)
    assert 0.02 < beta < 0.03
    assert implied_ppo_beta(0.8889, 16 * 64 * 64, 2.0, 1e-3) == pytest.approx(beta / 2)
    with pytest.raises(ValueError):
        implied_bp_beta(1e-4, 0.0)
