"""Tests for rtdmd.algorithms.consistency (spec §5.7; invariant 26)."""

import math

import pytest
import torch

from rtdmd.algorithms import consistency as K
from rtdmd.algorithms.cps import cps_step

torch.set_num_threads(1)

F64 = torch.float64
ETA = 0.9
SIN, COS = math.sin(ETA * math.pi / 2), math.cos(ETA * math.pi / 2)


def _rand(*shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _bview(t, x):
    return t.to(x.dtype).reshape([-1] + [1] * (x.dim() - 1))


# ---------------------------------------------------------------- invariant 26 (exact denoiser)
@pytest.mark.parametrize("two_sample", [True, False])
@pytest.mark.parametrize("num_moves,tau0", [(1, 600.0), (3, 150.0)])
def test_consistency_is_zero_for_exact_point_mass_denoiser(two_sample, num_moves, tau0):
    B = 64
    c = _rand(1, 3, 4, 4, seed=1)

    def exact(x, tau):  # v = (x - c)/t  =>  h = x - t v = c
        t = torch.clamp(_bview(tau, x) / 1000, min=1e-3)
        return (x - c) / t

    g = torch.Generator().manual_seed(2)
    t0 = tau0 / 1000
    x_t = (1 - t0) * c + t0 * torch.randn(B, 3, 4, 4, generator=g, dtype=F64)
    tau = torch.full((B,), tau0)
    loss, metrics = K.consistency_loss(exact, exact(x_t, tau), x_t, tau, eta=ETA, num_moves=num_moves,
                                       two_sample=two_sample, generator=g)
    assert abs(loss.item()) < 1e-20
    assert metrics["cons/nonfinite"] == 0.0
    if num_moves == 3:  # 3 moves of up to 200 from 150 reach t' = 0 for most samples
        assert metrics["cons/final_tau_mean"] < 50


# ---------------------------------------------------------------- invariant 26 (unbiasedness)
def _linear_fake(alpha_fn):
    """Point mass at 0 and a linear fake denoiser h(x, tau) = alpha(tau) * x."""
    def fake(x, tau):
        t = _bview(tau, x) / 1000
        return (1 - alpha_fn(tau).to(x.dtype).reshape(t.shape)) * x / t
    return fake


def _martingale_alpha(alpha_a, t_a):
    """alpha(tau') making E[h' | x_t] = h_a for one CPS move from t_a with the anchor velocity."""
    def alpha(tau):
        tp = tau.double() / 1000
        m = (1 - tp) * alpha_a + tp * COS * (1 + (1 - t_a) * (1 - alpha_a) / t_a)
        return torch.where(tau == t_a * 1000, torch.full_like(tp, alpha_a), alpha_a / m)
    return alpha, lambda tp: (1 - tp) * alpha_a + tp * COS * (1 + (1 - t_a) * (1 - alpha_a) / t_a)


def test_two_sample_estimator_is_unbiased_while_one_sample_mse_is_not():
    B, D = 4096, 16
    t_a, alpha_a = 0.6, 0.5
    alpha, m_fn = _martingale_alpha(alpha_a, t_a)
    fake = _linear_fake(alpha)
    x_t = _rand(B, D, seed=3)
    tau = torch.full((B,), 600.0)
    deltas = K.draw_consistency_deltas(B, 1, 200, generator=torch.Generator().manual_seed(4))
    tp = (600.0 - deltas[0].double()) / 1000
    amp = (alpha(600.0 - deltas[0].float()) * tp * SIN).view(B, 1)  # h' - h_a = amp * xi
    n = B * D

    l2, _ = K.consistency_loss(fake, fake(x_t, tau), x_t, tau, eta=ETA, deltas=deltas,
                               generator=torch.Generator().manual_seed(5))
    sd2 = math.sqrt((amp**4).mean().item() / n)
    assert abs(l2.item()) < 6 * sd2

    l1, _ = K.consistency_loss(fake, fake(x_t, tau), x_t, tau, eta=ETA, deltas=deltas, two_sample=False,
                               generator=torch.Generator().manual_seed(5))
    e1 = (amp**2).mean().item()
    sd1 = math.sqrt(2 * (amp**4).mean().item() / n)
    assert abs(l1.item() - e1) < 6 * sd1
    assert l1.item() > 100 * sd2  # the one-sample MSE is clearly biased away from 0

    # a non-martingale fake (constant alpha): the product estimator recovers the squared bias
    const = _linear_fake(lambda tau: torch.full_like(tau, alpha_a, dtype=F64))
    lb, _ = K.consistency_loss(const, const(x_t, tau), x_t, tau, eta=ETA, deltas=deltas,
                               generator=torch.Generator().manual_seed(6))
    bias = (alpha_a * m_fn(tp) - alpha_a).view(B, 1) * x_t
    a_c = (alpha_a * tp * SIN).view(B, 1)
    e_b = (bias**2).mean().item()
    sd_b = math.sqrt((2 * bias**2 * a_c**2 + a_c**4).mean().item() / n)
    assert abs(lb.item() - e_b) < 6 * sd_b
    assert e_b > 50 * sd_b


def test_chain_uses_anchor_velocity_and_cps_with_shared_tau_sequence():
    B = 5
    x_t, v_a = _rand(B, 3, seed=7), _rand(B, 3, seed=8)
    tau = torch.tensor([500.0, 30.0, 700.0, 980.0, 21.0], dtype=F64)
    deltas = torch.tensor([[10, 40, 100, 1, 21], [5, 5, 5, 5, 5]])
    calls = []

    def fake(x, tt):
        calls.append((tt.clone(), torch.is_grad_enabled()))
        return 0.5 * x

    loss, m = K.consistency_loss(fake, v_a, x_t, tau, eta=ETA, num_moves=2, deltas=deltas,
                                 generator=torch.Generator().manual_seed(9))
    tau1 = torch.clamp(tau - deltas[0], min=0)
    tau2 = torch.clamp(tau1 - deltas[1], min=0)
    assert calls and calls[0][0].dtype == F64  # float64 inputs -> float64 timesteps
    # 1 intermediate forward (k=1) per chain + 1 final forward per chain
    assert len(calls) == 4
    assert torch.equal(calls[0][0], tau1) and torch.equal(calls[2][0], tau1)
    assert torch.equal(calls[1][0], tau2) and torch.equal(calls[3][0], tau2)
    assert calls[0][1] is False and calls[1][1] is True  # stop-grad chain, grad on final forward
    assert m["cons/final_tau_mean"] == pytest.approx(tau2.mean().item())

    # reproduce chain 1 by hand: same generator order (chain-1 noise then chain-2 noise)
    g = torch.Generator().manual_seed(9)
    x1 = cps_step(x_t, v_a, tau / 1000, tau1 / 1000, ETA, generator=g)
    x2 = cps_step(x1, 0.5 * x1, tau1 / 1000, tau2 / 1000, ETA, generator=g)
    y1 = cps_step(x_t, v_a, tau / 1000, tau1 / 1000, ETA, generator=g)
    y2 = cps_step(y1, 0.5 * y1, tau1 / 1000, tau2 / 1000, ETA, generator=g)
    t2 = (tau2 / 1000).view(B, 1)
    h_a = x_t - (tau / 1000).view(B, 1) * v_a
    h1 = torch.where(t2 == 0, x2, x2 - t2 * 0.5 * x2)
    h2 = torch.where(t2 == 0, y2, y2 - t2 * 0.5 * y2)
    assert loss.item() == pytest.approx(((h1 - h_a) * (h2 - h_a)).mean().item(), rel=1e-10)


def test_gradient_flows_through_anchor_and_final_forwards_only():
    w = torch.tensor(0.3, dtype=F64, requires_grad=True)
    seen = []

    def fake(x, tt):
        seen.append(x.requires_grad)
        return w * x

    x_t = _rand(8, 4, seed=10)
    tau = torch.full((8,), 700.0)
    v_a = fake(x_t, tau)
    loss, _ = K.consistency_loss(fake, v_a, x_t, tau, eta=ETA, num_moves=2,
                                 generator=torch.Generator().manual_seed(11))
    loss.backward()
    assert w.grad is not None and w.grad.item() != 0.0
    # chain inputs are constants with stop-grad transitions
    assert seen[1:] == [False, False, False, False]
    # without stop-grad the intermediate forward sees a graph
    seen.clear()
    x_g = x_t.clone().requires_grad_(True)
    K.consistency_loss(fake, fake(x_g, tau), x_g, tau, eta=ETA, num_moves=2, stopgrad_transitions=False,
                       generator=torch.Generator().manual_seed(11))
    assert seen[1] is True


def test_nonfinite_consistency_loss_becomes_zero():
    x_t = _rand(4, 3, seed=12)
    tau = torch.full((4,), 500.0)

    def bad(x, tt):
        return torch.full_like(x, float("nan"))

    loss, m = K.consistency_loss(bad, torch.zeros_like(x_t), x_t, tau, eta=ETA,
                                 generator=torch.Generator().manual_seed(13))
    assert loss.item() == 0.0 and not loss.requires_grad
    assert m["cons/nonfinite"] == 1.0 and m["cons/loss"] == 0.0


def test_final_forward_skipped_when_all_final_timesteps_are_zero():
    x_t, v_a = _rand(3, 2, seed=14), _rand(3, 2, seed=15)
    tau = torch.tensor([5.0, 10.0, 1.0])
    n_calls = []
    fake = lambda x, tt: n_calls.append(1) or torch.zeros_like(x)  # noqa: E731
    loss, m = K.consistency_loss(fake, v_a, x_t, tau, eta=ETA, deltas=torch.tensor([[5, 10, 3]]))
    assert n_calls == [] and m["cons/final_tau_mean"] == 0.0
    # t' = 0: h' = x' = x_t - t v_a = h_a exactly
    assert loss.item() == pytest.approx(0.0, abs=1e-28)


def test_draw_deltas_range():
    d = K.draw_consistency_deltas(20_000, 2, 200.0, generator=torch.Generator().manual_seed(16))
    assert d.shape == (2, 20_000) and int(d.min()) == 1 and int(d.max()) == 200
    assert set(K.draw_consistency_deltas(100, 1, 0.0).unique().tolist()) == {1}
    assert set(K.draw_consistency_deltas(2000, 1, 2.6, generator=torch.Generator().manual_seed(0))
               .unique().tolist()) == {1, 2, 3}


def test_consistency_validation_errors():
    x = torch.zeros(2, 3)
    f = lambda a, b: a  # noqa: E731
    with pytest.raises(ValueError, match="eta"):
        K.consistency_loss(f, x, x, 500.0, eta=2.0)
    with pytest.raises(ValueError, match="deltas"):
        K.consistency_loss(f, x, x, 500.0, eta=0.5, deltas=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_moves"):
        K.consistency_loss(f, x, x, 500.0, eta=0.5, num_moves=0)
    with pytest.raises(ValueError, match="anchor_velocity"):
        K.consistency_loss(f, torch.zeros(2, 4), x, 500.0, eta=0.5)
