"""Tests for rtdmd.algorithms.cps (spec §2; invariants 3–9)."""

import math

import pytest
import torch

from rtdmd.algorithms import cps as C
from rtdmd.algorithms.ac_dmd import back_project

torch.set_num_threads(1)

F64 = torch.float64


def _rand(*shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# ---------------------------------------------------------------- invariant 3
def test_cps_with_eta_zero_equals_euler_and_interpolation_of_estimates():
    x, v = _rand(3, 4, 5, 5, seed=1), _rand(3, 4, 5, 5, seed=2)
    s, sn = 0.9, 0.6
    out = C.cps_step(x, v, s, sn, 0.0)
    assert out.dtype == F64
    torch.testing.assert_close(out, x + (sn - s) * v, rtol=0, atol=1e-14)
    x0_hat, eps_hat = x - s * v, x + (1 - s) * v
    torch.testing.assert_close(out, (1 - sn) * x0_hat + sn * eps_hat, rtol=0, atol=1e-13)
    # per-sample sigmas, eta = 0
    sv, snv = torch.tensor([0.9, 0.5, 0.3], dtype=F64), torch.tensor([0.6, 0.2, 0.0], dtype=F64)
    out = C.cps_step(x, v, sv, snv, 0.0)
    torch.testing.assert_close(out, x + (snv - sv).view(3, 1, 1, 1) * v, rtol=0, atol=1e-14)


def test_cps_eta_zero_draws_no_noise():
    x, v = _rand(2, 3, seed=1), _rand(2, 3, seed=2)
    state = torch.get_rng_state()
    C.cps_step(x, v, 0.9, 0.5, 0.0)
    assert torch.equal(state, torch.get_rng_state())


# ---------------------------------------------------------------- invariant 4
@pytest.mark.parametrize("eta", [0.0, 0.3, 0.9, 1.0])
def test_cps_to_sigma_zero_returns_x_minus_sigma_v_for_every_eta_without_noise(eta):
    x, v = _rand(2, 3, 4, 4, seed=3), _rand(2, 3, 4, 4, seed=4)
    state = torch.get_rng_state()
    out = C.cps_step(x, v, 0.75, 0.0, eta)
    assert torch.equal(state, torch.get_rng_state())  # no noise drawn
    torch.testing.assert_close(out, x - 0.75 * v, rtol=0, atol=1e-14)
    # external noise is ignored (coefficient 0)
    out2 = C.cps_step(x, v, 0.75, 0.0, eta, noise=1e3 * _rand(2, 3, 4, 4, seed=5))
    torch.testing.assert_close(out2, x - 0.75 * v, rtol=0, atol=1e-14)
    mu, rho = C.cps_mean_std(x, v, 0.75, 0.0, eta)
    assert float(rho.abs().max()) == 0.0


def test_cps_per_sample_zero_sigma_next_gets_no_noise_others_do():
    x, v = _rand(3, 2, 4, seed=6), _rand(3, 2, 4, seed=7)
    s = torch.tensor([0.8, 0.8, 0.5], dtype=F64)
    sn = torch.tensor([0.0, 0.4, 0.0], dtype=F64)
    noise = _rand(3, 2, 4, seed=8)
    out = C.cps_step(x, v, s, sn, 0.9, noise=noise)
    torch.testing.assert_close(out[0], x[0] - 0.8 * v[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(out[2], x[2] - 0.5 * v[2], rtol=0, atol=1e-14)
    assert (out[1] - (x[1] - 0.4 * v[1])).abs().max() > 0.1
    _, rho = C.cps_mean_std(x, v, s, sn, 0.9)
    assert rho.shape == (3, 1, 1)
    assert rho[0].item() == 0.0 and rho[2].item() == 0.0
    assert rho[1].item() == pytest.approx(0.4 * math.sin(0.9 * math.pi / 2))


# ---------------------------------------------------------------- stochastic formula
def test_cps_stochastic_step_matches_spec_formula():
    x, v, xi = _rand(2, 3, 4, seed=9), _rand(2, 3, 4, seed=10), _rand(2, 3, 4, seed=11)
    s, sn, eta = 0.9, 0.75, 0.9
    th = eta * math.pi / 2
    x0, eps = x - s * v, x + (1 - s) * v
    mu = (1 - sn) * x0 + sn * math.cos(th) * eps
    rho = sn * math.sin(th)
    out = C.cps_step(x, v, s, sn, eta, noise=xi)
    torch.testing.assert_close(out, mu + rho * xi, rtol=0, atol=1e-14)
    m, r = C.cps_mean_std(x, v, s, sn, eta)
    torch.testing.assert_close(m, mu, rtol=0, atol=1e-14)
    assert r.shape == (1, 1, 1) and r.item() == pytest.approx(rho, abs=1e-15)


def test_released_eta_gives_spec_rho_on_sd3_schedule():
    sig = [1.0, 0.9, 0.75, 0.5, 0.0]
    x = torch.zeros(1, 2)
    rhos = [C.cps_mean_std(x, x, a, b, 0.9)[1].item() for a, b in zip(sig, sig[1:])]
    assert rhos == pytest.approx([0.8889, 0.7408, 0.4938, 0.0], abs=1e-4)
    assert math.cos(0.9 * math.pi / 2) == pytest.approx(0.156434, abs=1e-6)


def test_cps_generator_makes_step_reproducible_and_uses_fp32_then_casts_back():
    x = _rand(2, 4, 3, 3, seed=12, dtype=torch.float32)
    v = _rand(2, 4, 3, 3, seed=13, dtype=torch.float32).to(torch.bfloat16)
    a = C.cps_step(x, v, 1.0, 0.9, 0.9, generator=torch.Generator().manual_seed(5))
    b = C.cps_step(x, v, 1.0, 0.9, 0.9, generator=torch.Generator().manual_seed(5))
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    # reference: fp32 arithmetic on the bf16 velocity, one final cast
    xi = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    mu, rho = C.cps_mean_std(x, v, 1.0, 0.9, 0.9)
    assert mu.dtype == torch.float32
    assert torch.equal(a, (mu + rho * xi).to(torch.bfloat16))


# ---------------------------------------------------------------- invariant 5
def test_three_cps_implementations_agree_given_the_same_noise():
    B = 4
    x, v = _rand(B, 3, 4, 4, seed=14, dtype=torch.float32), _rand(B, 3, 4, 4, seed=15, dtype=torch.float32)
    s, sn, eta = 0.9, 0.75, 0.9
    # 1) stateful step with generator noise
    out1 = C.cps_step(x, v, s, sn, eta, generator=torch.Generator().manual_seed(7))
    xi = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    # 2) per-sample transition with external noise ([B] sigma vectors)
    out2 = back_project(x, v, torch.full((B,), s), torch.full((B,), sn), eta, xi)
    # 3) stateless log-prob step with variance noise
    out3, logp, mu, std = C.cps_step_with_log_prob(x, v, torch.tensor(s), torch.tensor(sn), eta, noise=xi)
    torch.testing.assert_close(out1, out2, rtol=0, atol=1e-6)
    torch.testing.assert_close(out1, out3, rtol=0, atol=1e-6)
    assert logp.shape == (B,)


# ---------------------------------------------------------------- invariant 6
@pytest.mark.parametrize("s,sn,eta", [(1.0, 0.9, 0.9), (0.75, 0.5, 0.5), (0.9, 0.2, 1.0)])
def test_cps_preserves_interpolation_coefficients_under_oracle_velocity(s, sn, eta):
    n = 200_000
    g = torch.Generator().manual_seed(123)
    x0 = 2.0 * torch.randn(n, 1, generator=g, dtype=F64) + 0.5
    eps = torch.randn(n, 1, generator=g, dtype=F64)
    x = (1 - s) * x0 + s * eps
    v = eps - x0  # exact conditional velocity
    out = C.cps_step(x, v, s, sn, eta, generator=g)
    z = ((out - (1 - sn) * x0) / sn).flatten()
    se = 1 / math.sqrt(n)
    assert abs(z.mean().item()) < 6 * se
    assert abs(z.var().item() - 1.0) < 6 * math.sqrt(2.0) * se
    # the retained part of the noise is cos(theta)*eps (structure, not just variance)
    corr = torch.corrcoef(torch.stack([z, eps.flatten()]))[0, 1].item()
    assert abs(corr - math.cos(eta * math.pi / 2)) < 6 * se


# ---------------------------------------------------------------- invariant 7
def test_simplified_log_prob_at_sampling_time_is_minus_rho2_mean_xi2():
    x, v, xi = _rand(3, 2, 4, 4, seed=16), _rand(3, 2, 4, 4, seed=17), _rand(3, 2, 4, 4, seed=18)
    s, sn = 0.9, 0.75
    rho = sn * math.sin(0.45 * math.pi)
    nxt, logp, mu, std = C.cps_step_with_log_prob(x, v, s, sn, 0.9, noise=xi)
    expected = -(rho**2) * (xi**2).flatten(1).mean(1)
    torch.testing.assert_close(logp, expected, rtol=1e-12, atol=1e-14)
    assert std.shape == (1, 1, 1, 1) and std.item() == pytest.approx(rho)
    # re-evaluating the stored sample gives the same value
    torch.testing.assert_close(C.cps_log_prob(nxt, x, v, s, sn, 0.9), logp, rtol=1e-12, atol=1e-14)


def test_simplified_log_prob_is_zero_when_prev_sample_equals_mean():
    x, v = _rand(2, 3, 4, seed=19), _rand(2, 3, 4, seed=20)
    mu, _ = C.cps_mean_std(x, v, 0.9, 0.6, 0.9)
    _, logp, _, _ = C.cps_step_with_log_prob(x, v, 0.9, 0.6, 0.9, prev_sample=mu)
    assert torch.equal(logp, torch.zeros(2, dtype=F64))


def test_final_step_sample_is_mean_is_x0_with_zero_logp_and_std():
    x, v = _rand(2, 3, 4, 4, seed=21), _rand(2, 3, 4, 4, seed=22)
    sv = torch.tensor([0.5, 0.5], dtype=F64)
    nxt, logp, mu, std = C.cps_step_with_log_prob(x, v, sv, torch.zeros(2, dtype=F64), 0.9)
    torch.testing.assert_close(nxt, x - 0.5 * v, rtol=0, atol=1e-14)
    assert torch.equal(nxt, mu)
    assert torch.equal(logp, torch.zeros(2, dtype=F64))
    assert std.shape == (2, 1, 1, 1) and float(std.abs().max()) == 0.0
    # exact log-prob is defined as 0 where rho == 0
    ex = C.cps_log_prob(nxt, x, v, sv, torch.zeros(2, dtype=F64), 0.9, simplified=False)
    assert torch.equal(ex, torch.zeros(2, dtype=F64))


# ---------------------------------------------------------------- invariant 8
def test_simplified_log_prob_gradient_is_2rho2_times_exact_gaussian_gradient():
    x = _rand(2, 3, 4, 4, seed=23)
    nxt = _rand(2, 3, 4, 4, seed=24)
    s, sn, eta = 0.9, 0.75, 0.9
    rho = sn * math.sin(eta * math.pi / 2)
    v1 = _rand(2, 3, 4, 4, seed=25).requires_grad_(True)
    v2 = v1.detach().clone().requires_grad_(True)
    C.cps_log_prob(nxt, x, v1, s, sn, eta, simplified=True).sum().backward()
    C.cps_log_prob(nxt, x, v2, s, sn, eta, simplified=False).sum().backward()
    torch.testing.assert_close(v1.grad, 2 * rho**2 * v2.grad, rtol=1e-10, atol=1e-14)
    assert v1.grad.abs().max() > 1e-3


def test_exact_log_prob_matches_torch_normal_and_unreduced_shape():
    x, v, nxt = _rand(3, 2, 5, seed=26), _rand(3, 2, 5, seed=27), _rand(3, 2, 5, seed=28)
    s = torch.tensor([0.9, 0.8, 0.7], dtype=F64)
    sn = torch.tensor([0.6, 0.5, 0.4], dtype=F64)
    mu, rho = C.cps_mean_std(x, v, s, sn, 0.7)
    ref = torch.distributions.Normal(mu, rho.expand_as(mu)).log_prob(nxt)
    out = C.cps_log_prob(nxt, x, v, s, sn, 0.7, simplified=False)
    torch.testing.assert_close(out, ref.flatten(1).mean(1), rtol=1e-12, atol=1e-12)
    un = C.cps_log_prob(nxt, x, v, s, sn, 0.7, simplified=False, return_unreduced=True)
    assert un.shape == x.shape
    torch.testing.assert_close(un, ref, rtol=1e-12, atol=1e-12)
    un_s = C.cps_log_prob(nxt, x, v, s, sn, 0.7, return_unreduced=True)
    torch.testing.assert_close(un_s, -((nxt - mu) ** 2), rtol=0, atol=1e-14)


def test_log_prob_treats_next_sample_as_constant():
    x = _rand(2, 6, seed=29)
    v = _rand(2, 6, seed=30).requires_grad_(True)
    nxt = _rand(2, 6, seed=31).requires_grad_(True)
    C.cps_log_prob(nxt, x, v, 0.9, 0.7, 0.9).sum().backward()
    assert nxt.grad is None and v.grad is not None


# ---------------------------------------------------------------- invariant 9
def test_sde_mode_log_prob_is_mean_exact_gaussian_with_flow_grpo_std():
    x, v, xi = _rand(3, 2, 4, seed=32), _rand(3, 2, 4, seed=33), _rand(3, 2, 4, seed=34)
    s, sn, eta = 0.75, 0.5, 0.7
    std = eta * math.sqrt(s / (1 - s))
    dt = sn - s
    mu = x * (1 + std**2 * dt / (2 * s)) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    nxt, logp, m, scale = C.sde_step_with_log_prob(x, v, s, sn, eta, noise=xi)
    torch.testing.assert_close(m, mu, rtol=1e-12, atol=1e-14)
    assert scale.item() == pytest.approx(std * math.sqrt(-dt), rel=1e-12)
    torch.testing.assert_close(nxt, mu + std * math.sqrt(-dt) * xi, rtol=1e-12, atol=1e-14)
    ref = torch.distributions.Normal(mu, std * math.sqrt(-dt)).log_prob(nxt).flatten(1).mean(1)
    torch.testing.assert_close(logp, ref, rtol=1e-12, atol=1e-12)
    # re-evaluation of a given prev_sample
    other = _rand(3, 2, 4, seed=35)
    _, lp2, _, _ = C.sde_step_with_log_prob(x, v, s, sn, eta, prev_sample=other)
    ref2 = torch.distributions.Normal(mu, std * math.sqrt(-dt)).log_prob(other).flatten(1).mean(1)
    torch.testing.assert_close(lp2, ref2, rtol=1e-12, atol=1e-12)


def test_sde_mode_replaces_sigma_one_by_second_sigma():
    x, v, xi = _rand(2, 4, seed=36), _rand(2, 4, seed=37), _rand(2, 4, seed=38)
    _, _, _, scale = C.sde_step_with_log_prob(x, v, 1.0, 0.9, 0.8, noise=xi, sigma_one_replacement=0.9)
    assert scale.item() == pytest.approx(0.8 * math.sqrt(1.0 / (1 - 0.9)) * math.sqrt(0.1), rel=1e-12)
    with pytest.raises(ValueError, match="sigma_one_replacement"):
        C.sde_step_with_log_prob(x, v, 1.0, 0.9, 0.8)
    with pytest.raises(ValueError, match="eta"):
        C.sde_step_with_log_prob(x, v, 0.9, 0.8, 0.0)


# ---------------------------------------------------------------- schedule lookup
def test_lookup_sigmas_by_exact_timestep_equality():
    sig = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0], dtype=F64)
    ts = sig[:-1] * 1000
    s, sn = C.lookup_sigmas(torch.tensor([750.0, 1000.0, 500.0], dtype=F64), ts, sig)
    assert s.tolist() == [0.75, 1.0, 0.5] and sn.tolist() == [0.5, 0.9, 0.0]
    with pytest.raises(ValueError, match="not found"):
        C.lookup_sigmas(torch.tensor([750.5]), ts, sig)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan"), float("inf")])
def test_invalid_eta_raises_naming_eta_and_value(eta):
    x = torch.zeros(2, 3)
    for fn in (
        lambda: C.cps_step(x, x, 0.9, 0.5, eta),
        lambda: C.cps_mean_std(x, x, 0.9, 0.5, eta),
        lambda: C.cps_log_prob(x, x, x, 0.9, 0.5, eta),
        lambda: C.cps_step_with_log_prob(x, x, 0.9, 0.5, eta),
    ):
        with pytest.raises(ValueError, match=rf"eta.*{eta}"):
            fn()


def test_bad_noise_and_sigma_shapes_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="noise shape"):
        C.cps_step(x, x, 0.9, 0.5, 0.9, noise=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="sigma_next"):
        C.cps_step(x, x, 0.9, torch.zeros(3), 0.9)
    with pytest.raises(ValueError, match="eta"):
        C.cps_step(x, x, 0.9, 0.5, True)


# ---------------------------------------------------------------- memoised python-float sigmas
@pytest.mark.parametrize("s, sn, eta", [(0.75, 0.5, 1.0), (0.75, 0.5, 0.3), (0.25, 0.0, 1.0), (0.9, 0.4, 0.0)])
def test_float_sigmas_match_the_tensor_path_bit_for_bit(s, sn, eta):
    """Python-float sigmas use memoised constants; values, gradients and the RNG use equal the
    per-call tensor path (0-d tensor sigmas) exactly, on the first call and on a cached one."""
    x = torch.randn(3, 4, 5)
    noise = torch.randn(3, 4, 5)
    for _ in range(2):
        outs = []
        for sig, sig_n in ((s, sn), (torch.tensor(s), torch.tensor(sn))):
            v = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
            g = torch.Generator().manual_seed(7)
            step = C.cps_step(x, v, sig, sig_n, eta, generator=g)
            mu, rho = C.cps_mean_std(x, v, sig, sig_n, eta)
            nxt, lp, _, _ = C.cps_step_with_log_prob(x, v, sig, sig_n, eta, noise=noise, simplified=False)
            (step.sum() + mu.square().sum() + lp.sum()).backward()
            outs.append((step, mu, rho, nxt, lp, v.grad, torch.randn(1, generator=g)))
        for a, b in zip(*outs):
            assert torch.equal(a.detach().expand_as(b), b.detach())


def test_float_sigma_constants_are_not_cached_under_a_dispatch_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):  # as the planner's fake-tensor / memory-tracking modes
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    C._COEFFS.clear()
    with Seen():
        C.cps_mean_std(torch.zeros(2, 3), torch.zeros(2, 3), 0.61, 0.37, 1.0)
    assert not C._COEFFS
    out = C.cps_step(torch.zeros(2, 3), torch.ones(2, 3), 0.61, 0.37, 0.0)
    assert len(C._COEFFS) == 1 and torch.allclose(out, torch.full((2, 3), 0.37 - 0.61))
