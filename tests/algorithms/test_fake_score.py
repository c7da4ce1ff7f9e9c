"""The shared AC-DMD fake-score step (§5.2–§5.5, §5.7): one clamp rule, one N, both stages."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from rtdmd.algorithms.ac_dmd import ac_fake_loss, subinterval_forward, subinterval_target
from rtdmd.algorithms.fake_score import N_TRAIN, ac_fake_score_terms, draw_renoise, renoise_bounds

AC = SimpleNamespace(min_renoise_step=0.0, max_renoise_step=1000.0, offset=10.0, end_timestep=1000.0,
                     move_scale_out=True, weight_clamp=(0.0, 10.0))
DMD = SimpleNamespace(min_step=20, max_step=980)


def test_clamp_range_is_the_tightest_of_ac_dmd_and_n_minus_1():
    assert N_TRAIN == 1000
    assert renoise_bounds(AC, DMD) == (20.0, 980.0)
    wide = SimpleNamespace(min_step=0, max_step=5000)
    assert renoise_bounds(AC, wide) == (0.0, 999.0)


def test_draws_stay_in_range_and_pile_up_at_the_upper_bound_for_high_start_sigma():
    g = torch.Generator().manual_seed(0)
    tau = draw_renoise(0.958, 4000, AC, DMD, generator=g)
    assert float(tau.min()) >= 20.0 and float(tau.max()) <= 980.0
    # start = 958 + 10 = 968, end = 1000: (1000 - 980) / 32 = 62.5 % of the mass sits at 980 (§5.2)
    assert abs(float((tau == 980.0).float().mean()) - 0.625) < 0.03


def test_terms_are_the_ac_loss_of_the_subinterval_target():
    g = torch.Generator().manual_seed(1)
    x_s, z = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    tau = draw_renoise(0.3, 6, AC, DMD, generator=g)
    weight = torch.randn(2, 2, generator=g)

    def velocity(x, t):
        return x @ weight + t[:, None]

    terms, weights, metrics, (v, x_t) = ac_fake_score_terms(velocity, x_s, 0.3, tau, z, AC, eta=0.9)
    t = tau / N_TRAIN
    target, scale = subinterval_target(x_s, z, 0.3, t, True)
    assert torch.equal(x_t, subinterval_forward(x_s, z, 0.3, t))
    assert torch.equal(terms["fake/ac"], ac_fake_loss(velocity(x_t, t), target, scale, 0.0, 10.0))
    assert set(terms) == {"fake/ac"} and weights == {} and metrics == {}


def test_consistency_term_is_added_with_its_weight():
    g = torch.Generator().manual_seed(2)
    x_s, z = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    tau = draw_renoise(0.5, 4, AC, DMD, generator=g)
    cc = SimpleNamespace(eps_timestep=200.0, num_moves=1, two_sample=True, stopgrad_transitions=True, weight=0.5)
    terms, weights, _, _ = ac_fake_score_terms(lambda x, t: 0.5 * x + t[:, None], x_s, 0.5, tau, z, AC, eta=0.9,
                                               cc=cc, generator=torch.Generator().manual_seed(3))
    assert set(terms) == {"fake/ac", "fake/consistency"} and weights == {"fake/consistency": 0.5}
    assert bool(torch.isfinite(terms["fake/consistency"]))
