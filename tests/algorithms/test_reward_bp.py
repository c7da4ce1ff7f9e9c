"""Tests for rtdmd.algorithms.reward_bp (algorithm.md §7.3)."""

from __future__ import annotations

import pytest
import torch

from rtdmd.algorithms.reward_bp import BP_SUPPORTED_REWARDS, bp_hinge_loss, combine_rewards, select_bp_rewards


def test_combine_rewards_is_weighted_sum_not_mean():
    rewards = {
        "pickscore": torch.tensor([0.9, 1.0]),
        "clipscore": torch.tensor([0.3, 0.2]),
        "hpsv2": torch.tensor([0.25, 0.35]),
        "mean": torch.tensor([100.0, 100.0]),  # extra keys without weight are ignored
    }
    out = combine_rewards(rewards, {"pickscore": 1.0, "clipscore": 1.0, "hpsv2": 1.0})
    torch.testing.assert_close(out, torch.tensor([1.45, 1.55]))
    out_w = combine_rewards(rewards, {"pickscore": 2.0, "hpsv2": 0.5})
    torch.testing.assert_close(out_w, torch.tensor([1.925, 2.175]))


def test_combine_rewards_keeps_gradient():
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([3.0, 4.0], requires_grad=True)
    combine_rewards({"a": a, "b": b}, {"a": 2.0, "b": -1.0}).sum().backward()
    torch.testing.assert_close(a.grad, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(b.grad, torch.tensor([-1.0, -1.0]))


def test_combine_rewards_errors():
    with pytest.raises(KeyError):
        combine_rewards({"a": torch.zeros(2)}, {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError):
        combine_rewards({"a": torch.zeros(2)}, {})
    with pytest.raises(ValueError):
        combine_rewards({"a": torch.zeros(2), "b": torch.zeros(3)}, {"a": 1.0, "b": 1.0})


def test_bp_hinge_value_and_gradient():
    r = torch.tensor([1.5, 2.0, 3.5, 1.0], dtype=torch.float64, requires_grad=True)
    loss = bp_hinge_loss(r, margin=3.0, grad_scale=1e-4)
    expected = 1e-4 * (1.5 + 1.0 + 0.0 + 2.0) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    # Active hinge: plain reward ascent scaled by grad_scale / B; inactive (R > margin): 0.
    torch.testing.assert_close(r.grad, torch.tensor([-1e-4 / 4, -1e-4 / 4, 0.0, -1e-4 / 4], dtype=torch.float64))


def test_bp_hinge_zero_when_all_above_margin_and_validation():
    r = torch.tensor([4.0, 5.0], requires_grad=True)
    loss = bp_hinge_loss(r, margin=3.0, grad_scale=1.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(r.grad, torch.zeros(2))
    with pytest.raises(ValueError):
        bp_hinge_loss(torch.zeros(2, 2), 3.0, 1.0)
    with pytest.raises(ValueError):
        bp_hinge_loss(torch.zeros(0), 3.0, 1.0)
    with pytest.raises(ValueError):
        bp_hinge_loss(torch.zeros(2), 3.0, -1.0)


def test_select_bp_rewards():
    weights = {"pickscore": 1.0, "clipscore": 1.0, "hpsv2": 0.0, "geneval": 1.0, "ocr": 0.0}
    kept, ignored = select_bp_rewards(weights)
    assert kept == {"pickscore": 1.0, "clipscore": 1.0}
    assert ignored == ["geneval"]
    assert set(BP_SUPPORTED_REWARDS) == {"pickscore", "clipscore", "hpsv2"}
    kept2, ignored2 = select_bp_rewards({"toy_dist": 1.0}, supported=["toy_dist"])
    assert kept2 == {"toy_dist": 1.0} and ignored2 == []
