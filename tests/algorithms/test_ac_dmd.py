"""Tests for rtdmd.algorithms.ac_dmd (spec §5.1–§5.6; invariants 10–15, 18, 30)."""

import math

import pytest
import torch

from rtdmd.algorithms import ac_dmd as A
from rtdmd.algorithms.cps import cps_step
from rtdmd.algorithms.dmd import dmd_loss

torch.set_num_threads(1)

F64 = torch.float64


def _rand(*shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


PAIRS = [(0.0, 0.02), (0.0, 0.5), (0.3, 0.7), (0.5, 0.98), (0.9, 0.95), (0.7174965587, 0.98)]


# ---------------------------------------------------------------- invariant 10
@pytest.mark.parametrize("s,t", PAIRS)
def test_subinterval_coefficients_preserve_interpolation_marginal(s, t):
    a, sts = A.subinterval_coefficients(torch.tensor(s, dtype=F64), torch.tensor(t, dtype=F64))
    assert (a * (1 - s)).item() == pytest.approx(1 - t, abs=1e-14)
    assert (a**2 * s**2 + sts**2).item() == pytest.approx(t**2, abs=1e-14)


def test_subinterval_forward_marginal_is_interpolation_monte_carlo():
    n, s, t = 200_000, 0.4, 0.8
    g = torch.Generator().manual_seed(11)
    x0 = 3.0 * torch.randn(n, 1, generator=g, dtype=F64) - 1.0
    eps = torch.randn(n, 1, generator=g, dtype=F64)
    z = torch.randn(n, 1, generator=g, dtype=F64)
    xs = (1 - s) * x0 + s * eps
    xt = A.subinterval_forward(xs, z, s, t)
    w = ((xt - (1 - t) * x0) / t).flatten()
    se = 1 / math.sqrt(n)
    assert abs(w.mean().item()) < 6 * se
    assert abs(w.var().item() - 1) < 6 * math.sqrt(2) * se


def test_subinterval_forward_formula_with_per_sample_sigmas_and_dtype():
    xs = _rand(3, 2, 4, seed=1, dtype=torch.float32).to(torch.bfloat16)
    z = _rand(3, 2, 4, seed=2, dtype=torch.float32)
    s = torch.tensor([0.0, 0.5, 0.75])
    t = torch.tensor([0.3, 0.9, 0.98])
    out = A.subinterval_forward(xs, z, s, t)
    assert out.dtype == torch.bfloat16
    a = (1 - t) / (1 - s)
    sts = torch.sqrt(torch.clamp(t**2 - a**2 * s**2, min=1e-12))
    ref = (a.view(3, 1, 1) * xs.float() + sts.view(3, 1, 1) * z).to(torch.bfloat16)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("move_scale_out", [True, False])
def test_subinterval_forward_target_equals_the_two_functions_bitwise(move_scale_out):
    xs = _rand(3, 2, 4, seed=3, dtype=torch.float32)
    z = _rand(3, 2, 4, seed=4, dtype=torch.float32)
    s, t = torch.tensor([0.0, 0.5, 0.75]), torch.tensor([0.3, 0.9, 0.98])
    x_t, target, scale = A.subinterval_forward_target(xs, z, s, t, move_scale_out)
    ref_target, ref_scale = A.subinterval_target(xs, z, s, t, move_scale_out)
    assert torch.equal(x_t, A.subinterval_forward(xs, z, s, t))
    assert torch.equal(target, ref_target) and torch.equal(scale, ref_scale)


# ---------------------------------------------------------------- invariant 11
@pytest.mark.parametrize("s,t,u", [(0.0, 0.3, 0.9), (0.2, 0.5, 0.6), (0.5, 0.75, 0.98)])
def test_subinterval_kernels_compose(s, t, u):
    T = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    a_st, g_st = A.subinterval_coefficients(T(s), T(t))
    a_tu, g_tu = A.subinterval_coefficients(T(t), T(u))
    a_su, g_su = A.subinterval_coefficients(T(s), T(u))
    # (s->t) then (t->u): x_u = a_tu*a_st*x_s + a_tu*g_st*z1 + g_tu*z2
    assert (a_tu * a_st).item() == pytest.approx(a_su.item(), abs=1e-14)
    assert (a_tu**2 * g_st**2 + g_tu**2).item() == pytest.approx((g_su**2).item(), abs=1e-14)
    # same on tensors via subinterval_forward with zero noise / unit noise on one path
    xs = _rand(4, 3, seed=3)
    z0 = torch.zeros_like(xs)
    chained = A.subinterval_forward(A.subinterval_forward(xs, z0, s, t), z0, t, u)
    torch.testing.assert_close(chained, A.subinterval_forward(xs, z0, s, u), rtol=0, atol=1e-14)


# ---------------------------------------------------------------- invariant 12
@pytest.mark.parametrize("s,t", [(0.0, 0.5), (0.3, 0.7), (0.5, 0.9), (0.75, 0.96)])
def test_ac_target_is_time_derivative_of_forward_path(s, t):
    xs, z = _rand(2, 3, 4, seed=4), _rand(2, 3, 4, seed=5)
    h = 1e-6
    fd = (A.subinterval_forward(xs, z, s, t + h) - A.subinterval_forward(xs, z, s, t - h)) / (2 * h)
    target, scale = A.subinterval_target(xs, z, s, t, move_scale_out=False)
    assert float(scale.max()) == 1.0 and float(scale.min()) == 1.0
    torch.testing.assert_close(target, fd, rtol=1e-7, atol=1e-7)
    # a visibly different quantity (drop the s-dependent term) is not the derivative
    sts = A.subinterval_coefficients(torch.tensor(s, dtype=F64), torch.tensor(t, dtype=F64))[1]
    wrong = -xs / (1 - s) + (t / sts) * z
    if s > 0:
        assert (wrong - fd).abs().max() > 1e-3


# ---------------------------------------------------------------- invariant 13
def test_ac_target_conditional_mean_for_point_mass_data():
    n, s, t, c = 200_000, 0.3, 0.7, 0.7
    g = torch.Generator().manual_seed(21)
    eps = torch.randn(n, 1, generator=g, dtype=F64)
    z = torch.randn(n, 1, generator=g, dtype=F64)
    xs = (1 - s) * c + s * eps
    xt = A.subinterval_forward(xs, z, s, t)
    T, _ = A.subinterval_target(xs, z, s, t, move_scale_out=False)
    R = (T - (xt - c) / t).flatten()
    xt = xt.flatten()
    se = 1 / math.sqrt(n)
    assert abs(R.mean().item()) < 6 * R.std().item() * se
    corr = torch.corrcoef(torch.stack([R, xt]))[0, 1].item()
    assert abs(corr) < 6 * se
    # the residual is not trivially zero: it is noise orthogonal to x_t
    assert R.std().item() > 0.3
    # power: a target missing the s-dependent noise term is detected by the same statistic
    a, sts = A.subinterval_coefficients(torch.tensor(s, dtype=F64), torch.tensor(t, dtype=F64))
    wrong = (-xs / (1 - s) + (t / sts) * z).flatten() - (xt - c) / t
    assert abs(torch.corrcoef(torch.stack([wrong, xt]))[0, 1].item()) > 20 * se


# ---------------------------------------------------------------- invariant 14
def test_s_zero_is_ordinary_forward_process_and_velocity_target():
    xs, z = _rand(3, 2, 4, seed=6), _rand(3, 2, 4, seed=7)
    t = torch.tensor([0.1, 0.5, 0.98], dtype=F64)
    out = A.subinterval_forward(xs, z, 0.0, t)
    tv = t.view(3, 1, 1)
    torch.testing.assert_close(out, (1 - tv) * xs + tv * z, rtol=0, atol=1e-14)
    T, _ = A.subinterval_target(xs, z, 0.0, t, move_scale_out=False)
    torch.testing.assert_close(T, z - xs, rtol=0, atol=1e-13)
    Ts, scale = A.subinterval_target(xs, z, 0.0, t, move_scale_out=True)
    torch.testing.assert_close(scale.flatten(), t, rtol=0, atol=1e-14)
    torch.testing.assert_close(Ts, tv * (z - xs), rtol=0, atol=1e-13)


# ---------------------------------------------------------------- invariant 15
def test_move_scale_out_weighted_loss_equals_min_one_ten_sigma2_velocity_loss():
    B = 6
    xs, z, v = _rand(B, 2, 3, seed=8), _rand(B, 2, 3, seed=9), _rand(B, 2, 3, seed=10)
    s = torch.tensor([0.0, 0.0, 0.3, 0.5, 0.9, 0.95], dtype=F64)
    t = torch.tensor([0.05, 0.6, 0.32, 0.9, 0.92, 0.98], dtype=F64)
    T, one = A.subinterval_target(xs, z, s, t, move_scale_out=False)
    Tp, scale = A.subinterval_target(xs, z, s, t, move_scale_out=True)
    torch.testing.assert_close(Tp, scale * T, rtol=0, atol=1e-14)
    w = A.inverse_scale_weight(scale)
    elem = w * (scale * v - Tp) ** 2
    torch.testing.assert_close(elem, torch.clamp(10 * scale**2, max=1.0) * (v - T) ** 2, rtol=1e-10, atol=1e-13)
    # some samples are down-weighted (sigma_ts < 1/sqrt(10)), some are not
    assert float(scale.min()) < 1 / math.sqrt(10) < float(scale.max())
    loss = A.ac_fake_loss(v, Tp, scale)
    ref = (torch.clamp(10 * scale**2, max=1.0) * (v - T) ** 2).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    # without move_scale_out: plain MSE with weight 1
    assert A.ac_fake_loss(v, T, one).item() == pytest.approx(((v - T) ** 2).mean().item(), rel=1e-12)


def test_inverse_scale_weight_special_values():
    sc = torch.tensor([1.0, 0.5, 0.0, 1e-9, float("nan"), float("inf"), 0.1], dtype=F64)
    w = A.inverse_scale_weight(sc)
    assert w.tolist() == pytest.approx([1.0, 4.0, 10.0, 10.0, 0.0, 0.0, 10.0])
    assert bool(torch.isfinite(w).all())
    assert A.inverse_scale_weight(0.5, clamp_max=3.0).item() == 3.0
    assert A.inverse_scale_weight(4.0, clamp_min=0.5).item() == 0.5
    with pytest.raises(ValueError, match="clamp_min"):
        A.inverse_scale_weight(1.0, clamp_min=2.0, clamp_max=1.0)


def test_ac_fake_loss_gradient_flows_only_through_fake_velocity():
    v = _rand(2, 3, seed=11).requires_grad_(True)
    tgt = _rand(2, 3, seed=12).requires_grad_(True)
    scale = torch.tensor([[0.5], [1.0]], dtype=F64)
    A.ac_fake_loss(v, tgt, scale).backward()
    assert v.grad is not None and tgt.grad is None


# ---------------------------------------------------------------- invariant 18
@pytest.mark.parametrize("eta", [0.0, 0.5, 0.9, 1.0])
def test_back_projection_with_shared_noise_difference_is_linear_in_velocity_gap(eta):
    B = 5
    xt, vr, vf, xi = (_rand(B, 3, 4, seed=k) for k in (13, 14, 15, 16))
    s = torch.tensor([0.0, 0.3, 0.5, 0.75, 0.9], dtype=F64)
    t = torch.tensor([0.5, 0.4, 0.98, 0.8, 0.95], dtype=F64)
    xr = A.back_project(xt, vr, t, s, eta, xi)
    xf = A.back_project(xt, vf, t, s, eta, xi)
    cos = math.cos(eta * math.pi / 2)
    coef = (s * cos * (1 - t) - t * (1 - s)).view(B, 1, 1)
    torch.testing.assert_close(xf - xr, coef * (vf - vr), rtol=1e-12, atol=1e-13)
    # s = 0: ordinary DMD on x0 predictions
    torch.testing.assert_close(xr[0], xt[0] - 0.5 * vr[0], rtol=0, atol=1e-14)


def test_ac_generator_pair_draws_one_shared_noise():
    B = 3
    xt, vr, vf = _rand(B, 4, seed=17), _rand(B, 4, seed=18), _rand(B, 4, seed=19)
    s = torch.tensor([0.3, 0.5, 0.0], dtype=F64)
    t = torch.tensor([0.6, 0.9, 0.5], dtype=F64)
    xr, xf = A.ac_generator_pair(xt, vr, vf, t, s, 0.9, generator=torch.Generator().manual_seed(4))
    xi = torch.randn(xt.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    torch.testing.assert_close(xr, cps_step(xt, vr, t, s, 0.9, xi), rtol=0, atol=1e-14)
    torch.testing.assert_close(xf, cps_step(xt, vf, t, s, 0.9, xi), rtol=0, atol=1e-14)
    coef = (s * math.cos(0.45 * math.pi) * (1 - t) - t * (1 - s)).view(B, 1)
    torch.testing.assert_close(xf - xr, coef * (vf - vr), rtol=1e-12, atol=1e-13)
    # all s = 0: no noise drawn at all
    state = torch.get_rng_state()
    A.ac_generator_pair(xt, vr, vf, t, torch.zeros(B, dtype=F64), 0.9)
    assert torch.equal(state, torch.get_rng_state())


def test_ac_generator_loss_is_dmd_loss_on_back_projections():
    B = 3
    xs = _rand(B, 2, 4, seed=20).requires_grad_(True)
    xt, vr, vf, xi = (_rand(B, 2, 4, seed=k) for k in (21, 22, 23, 24))
    s = torch.tensor([0.3, 0.5, 0.0], dtype=F64)
    t = torch.tensor([0.6, 0.9, 0.5], dtype=F64)
    loss, m = A.ac_generator_loss(xs, xt, vr, vf, t, s, 0.9, xi)
    xr, xf = A.back_project(xt, vr, t, s, 0.9, xi), A.back_project(xt, vf, t, s, 0.9, xi)
    ref, mref = dmd_loss(xs, xf, xr)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert m == pytest.approx(mref)
    loss.backward()
    assert xs.grad is not None and bool(torch.isfinite(xs.grad).all())


# ---------------------------------------------------------------- invariant 30
@pytest.mark.parametrize("s", [0.0, 0.3849, 0.958, 0.975])
def test_renoise_tau_range_and_point_mass_at_hi(s):
    n = 40_000
    tau = A.renoise_timesteps(s, n, generator=torch.Generator().manual_seed(5))
    assert tau.shape == (n,) and tau.dtype == torch.float32
    lo = max(20.0, 1000 * s + 10)
    assert float(tau.min()) >= min(lo, 980.0) - 1e-3 and float(tau.max()) <= 980.0
    p_expected = min(1.0, 20.0 / (1000 - 1000 * s - 10))
    p = (tau == 980.0).double().mean().item()
    se = math.sqrt(max(p_expected * (1 - p_expected), 1e-12) / n)
    assert abs(p - p_expected) < 6 * se + 1e-9
    if p_expected < 1:
        inner = tau[tau < 980.0].double()
        # conditional on no clamp, tau is U[lo, 980]
        assert abs(inner.mean().item() - (lo + 980) / 2) < 6 * (980 - lo) / math.sqrt(12 * inner.numel())


def test_renoise_point_mass_two_percent_for_s_zero():
    tau = A.renoise_timesteps(torch.zeros(50_000), 50_000, generator=torch.Generator().manual_seed(6))
    p = (tau == 980.0).double().mean().item()
    assert abs(p - 20 / 990) < 0.004


def test_renoise_per_sample_start_end_rule_and_lo_clamp():
    s = torch.tensor([0.0, 0.6, 0.97])
    tau = A.renoise_timesteps(s, 3, end_timestep=500.0, generator=torch.Generator().manual_seed(7))
    # s=0: U[10, 500] then clamp >= 20; s=0.6: end <= start -> U[610, 611]; s=0.97: 980
    assert 20.0 <= tau[0].item() <= 500.0
    assert 610.0 <= tau[1].item() <= 611.0
    assert tau[2].item() == 980.0
    # offset 0 and lo=20: point mass at lo
    t2 = A.renoise_timesteps(0.0, 20_000, offset=0.0, generator=torch.Generator().manual_seed(8))
    assert float(t2.min()) == 20.0
    assert abs((t2 == 20.0).double().mean().item() - 0.02) < 0.006
    # hi above N-1 is capped at N-1
    t3 = A.renoise_timesteps(0.995, 10, hi=5000.0, generator=torch.Generator().manual_seed(9))
    assert float(t3.max()) <= 999.0


def test_renoise_validation():
    with pytest.raises(ValueError, match="lo"):
        A.renoise_timesteps(0.0, 4, lo=900.0, hi=100.0)
    with pytest.raises(ValueError, match="batch"):
        A.renoise_timesteps(0.0, 0)
    with pytest.raises(ValueError, match="start_sigma"):
        A.renoise_timesteps(torch.zeros(3), 4)


# ---------------------------------------------------------------- §5.1 start modes
def test_subinterval_start_next_sigma_returns_cps_output_and_clamped_sigma():
    xn = _rand(2, 3, seed=30).requires_grad_(True)
    xs, s = A.subinterval_start("next_sigma", sigma_current=0.9, sigma_next=0.75, x_next=xn)
    assert xs is xn and s.dtype == F64 and s.tolist() == [0.75, 0.75]
    _, s32 = A.subinterval_start("next_sigma", sigma_current=0.9, sigma_next=0.75, x_next=xn.float())
    assert s32.dtype == torch.float32
    _, s2 = A.subinterval_start("next_sigma", sigma_current=0.5, sigma_next=torch.tensor([0.0, 1.2]), x_next=xn)
    assert s2.tolist() == [0.0, 1.0]


def test_subinterval_start_fixed_boundary_is_cps_to_min_of_current_and_boundary():
    x, v, xi = _rand(2, 3, seed=31), _rand(2, 3, seed=32), _rand(2, 3, seed=33)
    sc = torch.tensor([0.9, 0.5], dtype=F64)
    xs, s = A.subinterval_start("fixed_boundary", sigma_current=sc, sigma_next=0.0, x_in=x,
                                velocity=v, eta=0.9, boundary_sigma=0.6, noise=xi)
    assert s.tolist() == pytest.approx([0.6, 0.5])
    torch.testing.assert_close(xs, cps_step(x, v, sc, s, 0.9, xi), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="boundary_sigma"):
        A.subinterval_start("fixed_boundary", sigma_current=sc, sigma_next=0.0, x_in=x, velocity=v, eta=0.9)
    with pytest.raises(ValueError, match="start_mode"):
        A.subinterval_start("random", sigma_current=sc, sigma_next=0.0, x_next=x)


def test_shape_mismatch_errors():
    with pytest.raises(ValueError, match="noise shape"):
        A.subinterval_forward(torch.zeros(2, 3), torch.zeros(2, 4), 0.0, 0.5)
    with pytest.raises(ValueError, match="target shape"):
        A.ac_fake_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
