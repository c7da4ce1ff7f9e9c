"""Analytic toy2d rewards (DESIGN.md §3): inputs are points ``[B, 2]``.

* ``toy2d_target`` (differentiable): ``r(x) = -||x - t||`` with a fixed target point ``t``;
  pulls mass toward the modes nearest ``t``.
* ``toy2d_region`` (not differentiable): ``r(x) = 1[x_0 > 0]`` — inside the right half-plane.

Both ignore the prompt; they plug into the same multi-scorer as the image rewards.
"""
from __future__ import annotations

import torch

TARGET = (2.5, 0.5)


def _points(x) -> torch.Tensor:
    if not torch.is_tensor(x) or x.dim() != 2 or x.shape[1] != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"toy2d rewards expect a float tensor of points [B, 2], got {shape}")
    return x


def target_reward(x: torch.Tensor) -> torch.Tensor:
    x = _points(x)
    t = torch.tensor(TARGET, dtype=x.dtype, device=x.device)
    return -torch.linalg.vector_norm(x - t, dim=1)


def region_reward(x: torch.Tensor) -> torch.Tensor:
    return (_points(x)[:, 0] > 0).to(torch.float32)


# Registry factories (``rtdmd.rewards.builtin`` registers them as ``toy2d_target`` /
# ``toy2d_region`` in the "points" domain). They return plain functions, which the registry wraps
# in a FunctionScorer: the eval path runs under no_grad, the BP path keeps the graph.
def target_fn(**_):
    return lambda x, prompts=None, metadata=None: target_reward(x)


def region_fn(**_):
    return lambda x, prompts=None, metadata=None: region_reward(x)
