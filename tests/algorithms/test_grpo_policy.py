"""Tests for rtdmd.algorithms.grpo: PPO clipped loss, KL, train-step selection and shared noise
(algorithm.md §11; the advantage tests are in test_grpo.py)."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest
import torch

from rtdmd.algorithms import grpo
from rtdmd.algorithms.grpo import (
    fallback_train_steps,
    filter_zero_advantages,
    kl_to_reference,
    ppo_loss,
    prompt_hash,
    resolve_clip_range,
    select_train_steps,
    shared_noise_for_batch,
    shared_step_noise,
    uses_shared_noise,
)

EPS = 1e-4




# ----------------------------------------------------------------------------------------------
# Invariant 21 — PPO clipped loss
# ----------------------------------------------------------------------------------------------


def _ratio_grad(ratios, advantages, clip_low, clip_high):
    """dL/d(ratio) via autograd through log_prob: dL/dlogp = dL/dratio * ratio."""
    ratios = torch.tensor(ratios, dtype=torch.float64)
    adv = torch.tensor(advantages, dtype=torch.float64)
    old = torch.linspace(-3.0, -1.0, len(ratios), dtype=torch.float64)
    new = (old + torch.log(ratios)).requires_grad_(True)
    loss, metrics = ppo_loss(new, old, adv, clip_low, clip_high)
    (g,) = torch.autograd.grad(loss, new)
    with torch.no_grad():
        r = torch.exp(new - old)
    return g / r, loss, metrics, r


@pytest.mark.parametrize("clip_low,clip_high", [(0.2, 0.3), (1e-5, 1e-5)])
def test_ppo_gradient_vanishes_outside_band_and_is_minus_a_over_b_inside(clip_low, clip_high):
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    far_hi, far_lo = 1.0 + 4 * clip_high, 1.0 - 4 * clip_low
    mid_hi, mid_lo = 1.0 + 0.5 * clip_high, 1.0 - 0.5 * clip_low
    cases = [
        # (ratio, A, expected zero?)
        (far_hi, 1.5, True),  # A>0, ratio > 1+eps_gt: clipped
        (far_lo, -0.7, True),  # A<0, ratio < 1-eps_lt: clipped
        (far_lo, 2.0, False),  # A>0, ratio below band: still pushed up
        (far_hi, -1.0, False),  # A<0, ratio above band: still pushed down
        (mid_hi, 0.8, False),
        (mid_lo, -0.3, False),
        (1.0, 1.2, False),  # ratio exactly 1 (the configs' situation)
        (1.0, -2.5, False),
    ]
    ratios = [c[0] for c in cases]
    advs = [c[1] for c in cases]
    B = len(cases)
    grad, _, metrics, r = _ratio_grad(ratios, advs, clip_low, clip_high)
    for i, (_, a, zero) in enumerate(cases):
        if zero:
            assert grad[i].item() == 0.0, i
        else:
            assert grad[i].item() == pytest.approx(-a / B, rel=1e-9, abs=1e-12), i
    assert r[6].item() == 1.0 and r[7].item() == 1.0
    expected_clip = sum(1 for x in r.tolist() if x < lo or x > hi) / B
    assert metrics["clip_frac"] == pytest.approx(expected_clip)
    assert metrics["clip_frac"] == pytest.approx(4 / B)


def test_ppo_at_ratio_one_is_plain_policy_gradient():
    g = torch.Generator().manual_seed(12)
    B = 16
    old = torch.randn(B, generator=g)
    adv = torch.randn(B, generator=g)
    new = old.clone().requires_grad_(True)
    loss, metrics = ppo_loss(new, old, adv, 1e-5, 1e-5)
    (grad,) = torch.autograd.grad(loss, new)
    torch.testing.assert_close(grad, -adv / B)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    assert metrics == {"clip_frac": 0.0, "approx_kl": 0.0, "ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0}


def test_ppo_loss_value_and_metrics():
    old = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    new = torch.log(torch.tensor([0.5, 1.1, 1.5, 0.95], dtype=torch.float64))
    adv = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    loss, m = ppo_loss(new, old, adv, 0.2, 0.2)
    ratio = torch.tensor([0.5, 1.1, 1.5, 0.95], dtype=torch.float64)
    expected = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert all(isinstance(v, float) for v in m.values())
    assert m["clip_frac"] == pytest.approx(0.5)
    assert m["ratio_min"] == pytest.approx(0.5) and m["ratio_max"] == pytest.approx(1.5)
    assert m["ratio_mean"] == pytest.approx(ratio.mean().item())
    assert m["approx_kl"] == pytest.approx(0.5 * (new**2).mean().item())


def test_ppo_old_log_prob_and_advantages_get_no_gradient():
    old = torch.zeros(3, requires_grad=True)
    adv = torch.ones(3, requires_grad=True)
    new = torch.zeros(3, requires_grad=True)
    loss, _ = ppo_loss(new, old, adv, 0.1, 0.1)
    loss.backward()
    assert old.grad is None and adv.grad is None
    assert new.grad is not None


def test_ppo_shape_mismatch_raises():
    with pytest.raises(ValueError):
        ppo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(4), 0.1, 0.1)


def test_resolve_clip_range():
    assert resolve_clip_range(1e-5) == (1e-5, 1e-5)
    assert resolve_clip_range(0.2, 0.1, 0.0) == (0.1, 0.2)
    assert resolve_clip_range(0.2, 0.0, 0.3) == (0.2, 0.3)
    with pytest.raises(ValueError):
        resolve_clip_range(0.0)


# ----------------------------------------------------------------------------------------------
# KL to reference
# ----------------------------------------------------------------------------------------------


def test_kl_to_reference_value_gradient_and_zero_std():
    g = torch.Generator().manual_seed(13)
    B, C, H, W = 3, 2, 4, 4
    mu = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).requires_grad_(True)
    ref = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    rho = torch.tensor([0.9, 0.5, 0.7], dtype=torch.float64).view(B, 1, 1, 1)
    kl = kl_to_reference(mu, ref, rho)
    expected = torch.stack([((mu[b] - ref[b]) ** 2).mean() / (2 * rho[b, 0, 0, 0] ** 2) for b in range(B)]).mean()
    assert kl.item() == pytest.approx(expected.item(), rel=1e-12)
    (grad,) = torch.autograd.grad(kl, mu)
    torch.testing.assert_close(grad, (mu - ref).detach() / (rho**2) / (B * C * H * W))
    # Scalar std broadcasts.
    assert kl_to_reference(mu, ref, 0.5).item() == pytest.approx(((mu - ref) ** 2).mean().item() / 0.5, rel=1e-12)
    # Deterministic last step (rho = 0) -> exactly zero.
    zero = kl_to_reference(mu, ref, torch.tensor([0.9, 0.0, 0.7], dtype=torch.float64).view(B, 1, 1, 1))
    assert zero.item() == 0.0


# ----------------------------------------------------------------------------------------------
# Invariant 24 — step selection
# ----------------------------------------------------------------------------------------------


def test_step_selection_is_deterministic_sorted_and_in_range():
    seen = set()
    for epoch in range(20):
        a = select_train_steps(42, epoch, 0, 2, 2)
        b = select_train_steps(42, epoch, 0, 2, 2)
        assert a == b
        assert a == sorted(a) and len(a) == 2 and len(set(a)) == 2
        assert all(0 <= s <= 2 for s in a)
        # Definition: python Random seeded seed + epoch*100000 + 104729.
        expected = sorted(random.Random(42 + epoch * 100000 + 104729).sample(range(0, 3), 2))
        assert a == expected
        seen.add(tuple(a))
    assert len(seen) > 1  # the selection changes across epochs


def test_step_selection_does_not_touch_global_rng():
    random.seed(0)
    before = random.random()
    random.seed(0)
    select_train_steps(1, 3, 1, 5, 3)
    assert random.random() == before


def test_step_selection_full_range_and_errors():
    assert select_train_steps(7, 1, 2, 4, 3) == [2, 3, 4]
    with pytest.raises(ValueError):
        select_train_steps(7, 1, 0, 2, 4)
    with pytest.raises(ValueError):
        select_train_steps(7, 1, 3, 2, 1)
    with pytest.raises(ValueError):
        select_train_steps(7, 1, 0, 2, 0)


def test_fallback_train_steps():
    assert fallback_train_steps(4, 1.0) == [0, 1, 2, 3]
    assert fallback_train_steps(4, 0.5) == [0, 1]
    assert fallback_train_steps(4, 0.8) == [0, 1, 2]  # floor(3.2)
    with pytest.raises(ValueError):
        fallback_train_steps(4, 0.1)


# ----------------------------------------------------------------------------------------------
# Invariant 23 — prompt-shared noise
# ----------------------------------------------------------------------------------------------


def test_prompt_hash_is_first_four_sha256_bytes_big_endian():
    for prompt in ["a photo of a cat", "", "Ünïcødé 猫"]:
        digest = hashlib.sha256(prompt.encode("utf-8")).digest()
        assert prompt_hash(prompt) == struct.unpack(">I", digest[:4])[0]
        assert 0 <= prompt_hash(prompt) < 2**32


def test_shared_noise_seed_formula():
    prompt, step, epoch = "a red bicycle", 2, 37
    seed = (prompt_hash(prompt) + 10007 * step + epoch * 100000) % 2**31
    assert grpo.shared_noise_seed(prompt, step, epoch) == seed
    expected = torch.randn((4, 3, 3), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(shared_step_noise(prompt, step, epoch, (4, 3, 3)), expected)
    # mod 2^31 keeps huge epochs valid
    assert 0 <= grpo.shared_noise_seed(prompt, 1, 10**9) < 2**31


def test_shared_noise_same_prompt_identical_regardless_of_position_or_rank():
    shape = (4, 8, 8)
    torch.manual_seed(123)  # global RNG state must not matter
    a = shared_step_noise("dog", 1, 5, shape)
    torch.manual_seed(999)
    torch.randn(100)
    b = shared_step_noise("dog", 1, 5, shape)
    assert torch.equal(a, b)
    # Two "ranks" holding different permutations of the same group.
    rank0 = shared_noise_for_batch(["dog", "cat", "dog"], 1, 5, shape)
    rank1 = shared_noise_for_batch(["cat", "dog"], 1, 5, shape)
    assert torch.equal(rank0[0], rank0[2]) and torch.equal(rank0[0], rank1[1])
    assert torch.equal(rank0[1], rank1[0])
    assert not torch.equal(rank0[0], rank0[1])
    # Different step or epoch -> different noise.
    assert not torch.equal(a, shared_step_noise("dog", 2, 5, shape))
    assert not torch.equal(a, shared_step_noise("dog", 1, 6, shape))
    # dtype only casts.
    assert torch.equal(shared_step_noise("dog", 1, 5, shape, dtype=torch.bfloat16), a.to(torch.bfloat16))


def test_trained_steps_get_fresh_noise():
    selected = select_train_steps(42, 0, 0, 2, 2)
    for i in range(4):
        assert uses_shared_noise(i, selected) == (i not in selected)
    assert not any(uses_shared_noise(i, None) for i in range(4))  # selection inactive


# ----------------------------------------------------------------------------------------------
# Zero-advantage filter
# ----------------------------------------------------------------------------------------------


def test_filter_keeps_all_nonzero_rows():
    adv = torch.arange(1, 13, dtype=torch.float32)
    idx = filter_zero_advantages(adv, 4, torch.Generator().manual_seed(0))
    assert torch.equal(idx, torch.arange(12))


def test_filter_rounds_up_with_random_dropped_rows():
    adv = torch.ones(16, 3)
    zero_rows = [1, 4, 5, 9, 10, 13, 15]  # 9 non-zero rows -> pad to 12
    adv[zero_rows] = 0.0
    idx = filter_zero_advantages(adv, 4, torch.Generator().manual_seed(1))
    assert idx.numel() == 12 and idx.dtype == torch.long
    assert torch.equal(idx, torch.sort(idx).values) and idx.unique().numel() == 12
    nonzero = [i for i in range(16) if i not in zero_rows]
    assert set(nonzero) <= set(idx.tolist())
    assert len(set(idx.tolist()) & set(zero_rows)) == 3
    again = filter_zero_advantages(adv, 4, torch.Generator().manual_seed(1))
    assert torch.equal(idx, again)


def test_filter_all_zero_keeps_num_batches_rows():
    adv = torch.zeros(8, 2)
    idx = filter_zero_advantages(adv, 4, torch.Generator().manual_seed(2))
    assert idx.numel() == 4 and idx.unique().numel() == 4
    assert int(idx.min()) >= 0 and int(idx.max()) < 8


def test_filter_rejects_indivisible_batch():
    with pytest.raises(ValueError):
        filter_zero_advantages(torch.ones(10), 4, torch.Generator().manual_seed(0))
