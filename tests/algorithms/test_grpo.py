"""Tests for rtdmd.algorithms.grpo (invariants 19, 20, 21, 23, 24 of algorithm.md §11)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rtdmd.algorithms.grpo import (
    PerPromptStatTracker,
    expand_to_steps,
    group_advantages,
)

EPS = 1e-4


# ----------------------------------------------------------------------------------------------
# Independent (loop-based) reference for the per-prompt normalisation
# ----------------------------------------------------------------------------------------------


def _pstd(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def naive_advantages(prompts, rewards, global_std):
    r = [float(x) for x in rewards]
    groups: dict[str, list[float]] = {}
    for p, x in zip(prompts, r):
        groups.setdefault(p, []).append(x)
    batch_mean = sum(r) / len(r)
    batch_std = _pstd(r)
    out = []
    for p, x in zip(prompts, r):
        g = groups[p]
        if len(g) == 1:  # K_g = 1: normalise against the whole batch
            out.append((x - batch_mean) / (batch_std + EPS))
            continue
        std = batch_std if global_std else _pstd(g)
        out.append((x - sum(g) / len(g)) / (std + EPS))
    return torch.tensor(out, dtype=torch.float64)


def make_batch(num_prompts=4, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [f"prompt {i}" for i in range(num_prompts) for _ in range(k)]
    perm = torch.randperm(len(prompts), generator=g).tolist()
    prompts = [prompts[i] for i in perm]  # groups scattered like the K-repeat sampler
    rewards = torch.rand(len(prompts), generator=g) * 3.0 - 1.0
    return prompts, rewards


# ----------------------------------------------------------------------------------------------
# Invariant 19 — per-prompt advantages
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("global_std", [False, True])
@pytest.mark.parametrize("value", [0.1, 1.0 / 3.0, -7.25, 0.7000000476837158, 123.456])
def test_identical_rewards_in_group_give_exact_zero(global_std, value):
    prompts, rewards = make_batch(num_prompts=3, k=24, seed=1)
    rewards = rewards.clone()
    mask = torch.tensor([p == "prompt 1" for p in prompts])
    rewards[mask] = value
    adv = group_advantages(prompts, rewards, global_std=global_std)
    assert torch.all(adv[mask] == 0.0)
    assert torch.all(adv[~mask] != 0.0)


@pytest.mark.parametrize("global_std", [False, True])
def test_all_identical_rewards_give_zero_everywhere(global_std):
    prompts, _ = make_batch(num_prompts=3, k=4, seed=2)
    rewards = torch.full((len(prompts),), 0.3)
    adv = group_advantages(prompts, rewards, global_std=global_std)
    assert torch.equal(adv, torch.zeros_like(adv))


@pytest.mark.parametrize("global_std", [False, True])
def test_per_prompt_matches_formula_and_groups_have_zero_mean(global_std):
    prompts, rewards = make_batch(num_prompts=5, k=8, seed=3)
    adv = group_advantages(prompts, rewards, global_std=global_std)
    assert adv.dtype == torch.float32 and adv.shape == (len(prompts),)
    expected = naive_advantages(prompts, rewards.tolist(), global_std)
    torch.testing.assert_close(adv.double(), expected, rtol=1e-6, atol=1e-6)
    for p in set(prompts):
        idx = [i for i, q in enumerate(prompts) if q == p]
        assert abs(adv[idx].double().sum().item()) < 1e-5


def test_global_std_uses_batch_std_not_group_std():
    prompts = ["a", "a", "b", "b"]
    rewards = torch.tensor([0.0, 2.0, 10.0, 10.5], dtype=torch.float64)
    batch_std = torch.tensor([0.0, 2.0, 10.0, 10.5]).double().std(unbiased=False).item()
    adv = group_advantages(prompts, rewards, global_std=True)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -0.25, 0.25], dtype=torch.float64) / (batch_std + EPS))
    adv_local = group_advantages(prompts, rewards, global_std=False)
    torch.testing.assert_close(adv_local, torch.tensor([-1.0, 1.0, -0.25, 0.25], dtype=torch.float64) / (torch.tensor([1.0, 1.0, 0.25, 0.25], dtype=torch.float64) + EPS))
    assert adv.dtype == torch.float64  # float64 in -> float64 out


def test_scaling_rewards_leaves_per_prompt_std_advantages_unchanged():
    prompts, rewards = make_batch(num_prompts=4, k=8, seed=4)
    base = group_advantages(prompts, rewards, global_std=False)
    for scale in (10.0, 0.5, 37.0):
        scaled = group_advantages(prompts, rewards * scale + 3.0, global_std=False)
        # Only eps breaks exact invariance: (r-m)/(c s + eps) vs (r-m)/(s + eps).
        torch.testing.assert_close(scaled, base, rtol=1e-3, atol=1e-4)
    # Same for global std.
    base_g = group_advantages(prompts, rewards, global_std=True)
    torch.testing.assert_close(group_advantages(prompts, rewards * 4.0 - 1.0, global_std=True), base_g, rtol=1e-3, atol=1e-4)


def test_all_singletons_is_whole_batch_normalisation():
    g = torch.Generator().manual_seed(5)
    prompts = [f"p{i}" for i in range(10)]
    rewards = torch.randn(10, generator=g, dtype=torch.float64)
    for global_std in (False, True):
        adv = group_advantages(prompts, rewards, global_std=global_std)
        expected = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + EPS)
        torch.testing.assert_close(adv, expected)


def test_singleton_in_mixed_batch_uses_batch_statistics():
    prompts = ["a", "a", "a", "solo"]
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64)
    adv = group_advantages(prompts, rewards, global_std=False)
    expected = naive_advantages(prompts, rewards.tolist(), global_std=False)
    torch.testing.assert_close(adv, expected)
    assert adv[3] > 1.0  # the singleton keeps a signal instead of a useless 0


def test_clip_clamps_and_preserves_zeros():
    prompts = ["a"] * 8 + ["b"] * 4
    rewards = torch.tensor([0.0] * 7 + [100.0] + [0.5] * 4)
    raw = group_advantages(prompts, rewards, global_std=False)
    assert raw.abs().max() > 2.0
    clipped = group_advantages(prompts, rewards, global_std=False, clip=2.0)
    torch.testing.assert_close(clipped, raw.clamp(-2.0, 2.0))
    assert clipped.abs().max() <= 2.0
    assert torch.all(clipped[8:] == 0.0)


def test_input_validation():
    with pytest.raises(ValueError):
        group_advantages(["a", "b"], torch.zeros(3))
    with pytest.raises(ValueError):
        group_advantages(["a", "b"], torch.zeros(2, 2))
    with pytest.raises(ValueError):
        group_advantages(["a", "b"], {"x": torch.zeros(2)})  # weights missing
    with pytest.raises(KeyError):
        group_advantages(["a", "b"], {"x": torch.zeros(2)}, weights={"x": 1.0, "y": 1.0})
    with pytest.raises(ValueError):
        group_advantages(["a", "b"], torch.zeros(2), weights={"x": 1.0})
    with pytest.raises(ValueError):
        group_advantages(["a", "b"], torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError):
        group_advantages(["a", "b"], torch.zeros(2), clip=0.0)


# ----------------------------------------------------------------------------------------------
# Invariant 20 — weighted-advantage path
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("global_std", [False, True])
def test_weighted_path_global_mean_zero_std_one_identical_columns(global_std):
    prompts, r1 = make_batch(num_prompts=4, k=6, seed=6)
    g = torch.Generator().manual_seed(7)
    r2 = torch.randn(len(prompts), generator=g) * 5.0
    r3 = torch.rand(len(prompts), generator=g)
    rewards = {"pickscore": r1, "hpsv2": r2, "geneval": r3, "mean": r1 + r2 + r3}
    weights = {"pickscore": 1.0, "hpsv2": 0.5, "geneval": 2.0}
    adv = group_advantages(prompts, rewards, weights=weights, global_std=global_std)
    assert abs(adv.double().mean().item()) < 1e-6
    assert abs(adv.double().std(unbiased=False).item() - 1.0) < 1e-3

    # Manual: per-reward normalisation, weighted sum, global renormalisation over the tiled
    # [N, T] matrix (as the reference does) -> same numbers in every column.
    total = sum(w * naive_advantages(prompts, rewards[k].tolist(), global_std) for k, w in weights.items())
    T = 3
    tiled = total.unsqueeze(1).expand(-1, T)
    expected_tiled = (tiled - tiled.mean()) / (tiled.std(unbiased=False) + EPS)
    got_tiled = expand_to_steps(adv, T)
    assert got_tiled.shape == (len(prompts), T)
    for t in range(1, T):
        assert torch.equal(got_tiled[:, t], got_tiled[:, 0])
    torch.testing.assert_close(got_tiled.double(), expected_tiled, rtol=1e-5, atol=1e-5)


def test_weighted_path_ignores_extra_reward_keys_and_uses_weights():
    prompts, r1 = make_batch(num_prompts=2, k=4, seed=8)
    r2 = r1.flip(0)
    a = group_advantages(prompts, {"x": r1, "y": r2, "junk": torch.zeros(8)}, weights={"x": 1.0, "y": 3.0})
    b = group_advantages(prompts, {"x": r1, "y": r2}, weights={"x": 1.0, "y": 3.0})
    assert torch.equal(a, b)
    c = group_advantages(prompts, {"x": r1, "y": r2}, weights={"x": 3.0, "y": 1.0})
    assert not torch.allclose(b, c)


def test_expand_to_steps_validation():
    with pytest.raises(ValueError):
        expand_to_steps(torch.zeros(2, 2), 3)
    with pytest.raises(ValueError):
        expand_to_steps(torch.zeros(2), 0)


# ----------------------------------------------------------------------------------------------
# PerPromptStatTracker
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("global_std", [False, True])
def test_tracker_equals_group_advantages_after_clear(global_std):
    prompts, rewards = make_batch(num_prompts=4, k=6, seed=9)
    tracker = PerPromptStatTracker(global_std)
    adv = tracker.update(prompts, rewards)
    assert torch.equal(adv, group_advantages(prompts, rewards, global_std=global_std))
    tracker.clear()
    assert tracker.state_dict()["stats"] == {}
    adv2 = tracker.update(prompts, rewards)
    assert torch.equal(adv2, adv)


def test_tracker_history_persists_until_clear():
    tracker = PerPromptStatTracker(global_std=False)
    tracker.update(["a", "a"], torch.tensor([0.0, 2.0], dtype=torch.float64))
    adv = tracker.update(["a", "a"], torch.tensor([4.0, 6.0], dtype=torch.float64))
    hist = [0.0, 2.0, 4.0, 6.0]
    mean, std = sum(hist) / 4, _pstd(hist)
    torch.testing.assert_close(adv, torch.tensor([(4.0 - mean) / (std + EPS), (6.0 - mean) / (std + EPS)], dtype=torch.float64))
    stats = tracker.stats(top_fraction=0.25)
    assert stats == {"avg_group_size": 4.0, "num_prompts": 1.0, "top_reward_mean": 6.0}


def test_tracker_record_keeps_the_same_history_as_update_and_rejects_non_finite():
    prompts, r = ["b", "a", "b", "c"], torch.tensor([0.3, -1.25, 0.7, 2.0])
    updated, recorded = PerPromptStatTracker(global_std=False), PerPromptStatTracker(global_std=False)
    updated.update(prompts, r)
    recorded.record(prompts, r)
    assert recorded.state_dict() == updated.state_dict() and recorded.stats() == updated.stats()
    with pytest.raises(ValueError, match="non-finite"):
        recorded.record(["a"], torch.tensor([float("nan")]))


def test_tracker_identical_rewards_zero():
    tracker = PerPromptStatTracker(global_std=True)
    adv = tracker.update(["a"] * 4 + ["b"] * 4, torch.tensor([0.1] * 4 + [0.2, 0.4, 0.6, 0.8]))
    assert torch.all(adv[:4] == 0.0)


def test_tracker_state_round_trip_through_json():
    prompts, rewards = make_batch(num_prompts=3, k=4, seed=10)
    tracker = PerPromptStatTracker(global_std=True)
    tracker.update(prompts, rewards)
    state = json.loads(json.dumps(tracker.state_dict()))  # plain python types only
    assert state["global_std"] is True
    assert sorted(state["history_prompts"]) == sorted(set(prompts))

    restored = PerPromptStatTracker(global_std=True)
    restored.load_state_dict(state)
    assert restored.state_dict() == tracker.state_dict()
    assert restored.stats() == tracker.stats()
    more_prompts, more_rewards = make_batch(num_prompts=3, k=4, seed=11)
    assert torch.equal(restored.update(more_prompts, more_rewards), tracker.update(more_prompts, more_rewards))

    with pytest.raises(ValueError):
        PerPromptStatTracker(global_std=False).load_state_dict(state)
