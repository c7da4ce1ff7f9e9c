"""Tests for rtdmd.algorithms.dmd (spec §4.1, §4.2; invariants 16, 17, 27)."""

import math

import pytest
import torch

from rtdmd.algorithms import dmd as D

torch.set_num_threads(1)

F64 = torch.float64


def _rand(*shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# ---------------------------------------------------------------- invariant 16
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dmd_loss_gradient_is_g_over_numel_and_loss_is_half_mean_g2(dtype):
    B, Ch, H, W = 3, 2, 4, 5
    x = _rand(B, Ch, H, W, seed=1, dtype=dtype).requires_grad_(True)
    xf, xr = _rand(B, Ch, H, W, seed=2, dtype=dtype), _rand(B, Ch, H, W, seed=3, dtype=dtype)
    loss, metrics = D.dmd_loss(x, xf, xr)
    assert loss.dtype == dtype and loss.dim() == 0
    loss.backward()
    x64, xf64, xr64 = x.detach().double(), xf.double(), xr.double()
    g = (xf64 - xr64) / (x64 - xr64).abs().mean(dim=(1, 2, 3), keepdim=True)
    tol = 1e-12 if dtype == F64 else 1e-6
    torch.testing.assert_close(x.grad.double(), g / (B * Ch * H * W), rtol=tol, atol=tol * 1e-2)
    assert metrics["dmd/loss"] == pytest.approx(0.5 * (g**2).mean().item(), rel=1e-12)
    assert loss.item() == pytest.approx(0.5 * (g**2).mean().item(), rel=tol)
    assert metrics["dmd/grad_norm"] == pytest.approx(torch.linalg.vector_norm(g).item(), rel=1e-12)
    assert isinstance(metrics["dmd/loss"], float) and isinstance(metrics["dmd/grad_norm"], float)


def test_dmd_loss_pushes_sample_towards_real_minus_fake():
    x = _rand(2, 8, seed=4).requires_grad_(True)
    xr = _rand(2, 8, seed=5)
    xf = xr + 0.1  # fake is above real everywhere
    loss, _ = D.dmd_loss(x, xf, xr)
    loss.backward()
    # gradient descent step -x.grad points along x_r - x_f (< 0)
    assert bool((-x.grad < 0).all())


def test_dmd_loss_without_normalisation_uses_raw_difference():
    x = _rand(2, 3, 4, seed=6).requires_grad_(True)
    xf, xr = _rand(2, 3, 4, seed=7), _rand(2, 3, 4, seed=8)
    loss, _ = D.dmd_loss(x, xf, xr, normalize=False)
    loss.backward()
    torch.testing.assert_close(x.grad, (xf - xr) / x.numel(), rtol=1e-12, atol=1e-16)
    assert loss.item() == pytest.approx(0.5 * ((xf - xr) ** 2).mean().item(), rel=1e-12)


def test_dmd_bf16_latents_get_float64_accurate_gradient():
    x = _rand(2, 4, 4, seed=9, dtype=torch.float32).to(torch.bfloat16).requires_grad_(True)
    xf = _rand(2, 4, 4, seed=10, dtype=torch.float32).to(torch.bfloat16)
    xr = _rand(2, 4, 4, seed=11, dtype=torch.float32).to(torch.bfloat16)
    loss, _ = D.dmd_loss(x, xf, xr)
    loss.backward()
    assert loss.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    g = D.dmd_gradient(x, xf, xr)
    assert g.dtype == F64
    torch.testing.assert_close(x.grad.double(), (g / x.numel()).to(torch.bfloat16).double())


# ---------------------------------------------------------------- invariant 17
def test_dmd_gradient_is_exactly_zero_when_fake_equals_real():
    x = _rand(3, 2, 4, 4, seed=12).requires_grad_(True)
    xr = _rand(3, 2, 4, 4, seed=13)
    loss, metrics = D.dmd_loss(x, xr.clone(), xr)
    loss.backward()
    assert loss.item() == 0.0 and metrics["dmd/grad_norm"] == 0.0
    assert bool((x.grad == 0).all())


def test_dmd_nan_is_cleaned_to_zero_when_sample_equals_real():
    x = _rand(2, 3, 4, seed=14)
    xr = x.clone()
    xr[1] += 1.0  # sample 0: x == x_r == x_f -> 0/0 -> nan -> 0
    xf = xr.clone()
    xf[1] += 0.5
    x.requires_grad_(True)
    loss, _ = D.dmd_loss(x, xf, xr)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(x.grad).all())
    assert bool((x.grad[0] == 0).all()) and bool((x.grad[1] != 0).all())


def test_dmd_loss_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        D.dmd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------- invariant 27 & §4.2 indices
@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (8.0, 4.0), (-8.0, 4.0), (0.0, 50.0)])
def test_logit_normal_index_stays_in_min_max_range(mean, std):
    g = torch.Generator().manual_seed(0)
    k = D.sample_timestep_index(20_000, min_step=20, max_step=980, mode="logit_normal",
                                logit_mean=mean, logit_std=std, generator=g)
    assert k.dtype == torch.int64 and k.shape == (20_000,)
    assert int(k.min()) >= 20 and int(k.max()) <= 980
    if std == 50.0:  # saturating sigmoid hits both ends
        assert int(k.min()) == 20 and int(k.max()) == 980


def test_logit_normal_index_matches_floor_formula():
    R = 980 - 20 + 1
    k = D.sample_timestep_index(1000, min_step=20, max_step=980, mode="logit_normal",
                                logit_mean=0.3, logit_std=1.2, generator=torch.Generator().manual_seed(3))
    z = torch.randn(1000, generator=torch.Generator().manual_seed(3), dtype=F64)
    u = torch.sigmoid(z * 1.2 + 0.3)
    ref = torch.clamp(torch.floor(u * R).long(), max=R - 1) + 20
    assert torch.equal(k, ref)


def test_max_step_is_capped_at_999_and_uniform_covers_range():
    g = torch.Generator().manual_seed(1)
    k = D.sample_timestep_index(50_000, min_step=990, max_step=5000, generator=g)
    assert int(k.min()) == 990 and int(k.max()) == 999
    assert set(k.unique().tolist()) == set(range(990, 1000))
    k2 = D.sample_timestep_index(10_000, min_step=0, max_step=2000, mode="logit_normal",
                                 logit_std=30.0, generator=g)
    assert int(k2.max()) == 999 and int(k2.min()) == 0


def test_uniform_index_is_roughly_uniform():
    k = D.sample_timestep_index(40_000, min_step=20, max_step=980, generator=torch.Generator().manual_seed(2))
    # mean of U{20..980} is 500 with sd ~277; SE of the mean ~1.4
    assert abs(k.double().mean().item() - 500.0) < 10.0


def test_index_sampling_validation_errors():
    with pytest.raises(ValueError, match="max_step"):
        D.sample_timestep_index(4, min_step=500, max_step=100)
    with pytest.raises(ValueError, match="min_step"):
        D.sample_timestep_index(4, min_step=-1, max_step=100)
    with pytest.raises(ValueError, match="mode"):
        D.sample_timestep_index(4, min_step=0, max_step=100, mode="beta")
    with pytest.raises(ValueError, match="batch"):
        D.sample_timestep_index(0, min_step=0, max_step=100)


# ---------------------------------------------------------------- plain fake-score loss
def test_plain_fake_score_loss_is_velocity_mse():
    v, z, x0 = _rand(2, 3, 4, seed=20), _rand(2, 3, 4, seed=21), _rand(2, 3, 4, seed=22)
    loss = D.plain_fake_score_loss(v, z, x0)
    assert loss.item() == pytest.approx(((v - (z - x0)) ** 2).mean().item(), rel=1e-12)
    assert D.plain_fake_score_loss(z - x0, z, x0).item() == 0.0
    assert D.plain_fake_score_loss(v.float(), z.float(), x0.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="same shape"):
        D.plain_fake_score_loss(v, z, x0[:1])
    assert math.isfinite(loss.item())
