"""Differentiable reward back-propagation loss on the deterministic last step (algorithm.md §7.3).

Equations implemented
---------------------
* ``combine_rewards``::

      R_w = sum_k w_k R_k

  This is a weighted **sum**.  The reference's multi-scorer calls the same quantity ``mean``
  (§6.2, §12.10); the name is misleading, the arithmetic is identical (no division by the
  number of rewards or by ``sum_k w_k``).

* ``bp_hinge_loss``::

      L_bp = grad_scale * mean_B relu(margin - R_w)

  With the released settings (margin 3.0, scale 1e-4, three CLIP-like rewards of weight 1 whose
  sum is ~1.5) the hinge is always active, so ``L_bp`` is plain reward ascent scaled by 1e-4.

* ``select_bp_rewards`` keeps the rewards of the training reward function that have a
  differentiable implementation (reference: pickscore, clipscore, hpsv2) and lists the others,
  which the reference ignores with a warning.

Deliberate departures from the reference
----------------------------------------
1. ``combine_rewards`` is named for what it computes (a sum) and fails on a missing reward
   instead of silently skipping it; keys of ``rewards`` that have no weight are ignored.
2. Zero-weight rewards are dropped by ``select_bp_rewards`` (they could not contribute a
   gradient but would still cost a scorer forward/backward).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

__all__ = ["BP_SUPPORTED_REWARDS", "bp_hinge_loss", "combine_rewards", "select_bp_rewards"]

BP_SUPPORTED_REWARDS: tuple[str, ...] = ("pickscore", "clipscore", "hpsv2")


def combine_rewards(rewards: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Weighted sum ``sum_k w_k r_k`` over the keys of ``weights`` (the reference's "mean")."""
    if not weights:
        raise ValueError("weights is empty")
    missing = [k for k in weights if k not in rewards]
    if missing:
        raise KeyError(f"no reward for weighted keys {missing}; have {sorted(rewards)}")
    total: torch.Tensor | None = None
    shape = None
    for k, w in weights.items():
        r = rewards[k]
        if shape is None:
            shape = r.shape
        elif r.shape != shape:
            raise ValueError(f"reward {k!r} has shape {tuple(r.shape)}, expected {tuple(shape)}")
        term = r * float(w)
        total = term if total is None else total + term
    assert total is not None
    return total


def bp_hinge_loss(weighted_reward: torch.Tensor, margin: float, grad_scale: float) -> torch.Tensor:
    """``grad_scale * mean(relu(margin - R_w))`` over the batch."""
    if weighted_reward.dim() != 1:
        raise ValueError(f"weighted_reward must be [B], got shape {tuple(weighted_reward.shape)}")
    if weighted_reward.numel() == 0:
        raise ValueError("empty batch")
    if grad_scale < 0:
        raise ValueError(f"grad_scale must be >= 0, got {grad_scale}")
    return grad_scale * torch.relu(margin - weighted_reward).mean()


def select_bp_rewards(
    weights: Mapping[str, float], supported: Iterable[str] = BP_SUPPORTED_REWARDS
) -> tuple[dict[str, float], list[str]]:
    """Split training-reward weights into (differentiable subset with non-zero weight, ignored keys)."""
    supported = set(supported)
    kept = {k: float(w) for k, w in weights.items() if k in supported and w != 0}
    ignored = [k for k, w in weights.items() if k not in supported and w != 0]
    return kept, ignored
