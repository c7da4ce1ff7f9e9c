"""SubGRPO step selection and prompt-shared step noise (§6.2, §6.3).

Split out of :mod:`rtdmd.algorithms.grpo` (which re-exports every name): which denoising steps
an epoch trains with PPO, and the per-prompt shared noise used on the other steps.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import torch

__all__ = ["select_train_steps", "fallback_train_steps", "prompt_hash", "shared_noise_seed", "shared_step_noise",
           "uses_shared_noise", "shared_noise_for_batch"]

_STEP_SEED_OFFSET = 104729
_EPOCH_SEED_STRIDE = 100000
_STEP_NOISE_STRIDE = 10007
_SEED_MOD = 2**31


def select_train_steps(seed: int, epoch: int, range_start: int, range_end: int, num_steps: int) -> list[int]:
    """SubGRPO PPO steps for an epoch: sorted sample of ``num_steps`` from ``[start, end]``."""
    if range_end < range_start:
        raise ValueError(f"empty step range [{range_start}, {range_end}]")
    population = range(range_start, range_end + 1)
    if not 1 <= num_steps <= len(population):
        raise ValueError(f"num_steps={num_steps} must be in [1, {len(population)}]")
    rng = random.Random(seed + epoch * _EPOCH_SEED_STRIDE + _STEP_SEED_OFFSET)
    return sorted(rng.sample(population, num_steps))


def fallback_train_steps(num_sampler_steps: int, timestep_fraction: float) -> list[int]:
    """``{0, ..., int(K * timestep_fraction) - 1}`` (step selection disabled)."""
    if num_sampler_steps < 1:
        raise ValueError("num_sampler_steps must be >= 1")
    if not 0 < timestep_fraction <= 1:
        raise ValueError("timestep_fraction must be in (0, 1]")
    n = int(num_sampler_steps * timestep_fraction)
    if n < 1:
        raise ValueError(f"K={num_sampler_steps} * timestep_fraction={timestep_fraction} trains no step")
    return list(range(n))


def prompt_hash(prompt: str) -> int:
    """First 4 bytes of SHA-256(utf-8 prompt) as a big-endian unsigned int."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:4], "big")


def shared_noise_seed(prompt: str, step_index: int, epoch: int) -> int:
    return (prompt_hash(prompt) + _STEP_NOISE_STRIDE * step_index + epoch * _EPOCH_SEED_STRIDE) % _SEED_MOD


def shared_step_noise(
    prompt: str,
    step_index: int,
    epoch: int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Prompt-shared CPU noise ``xi`` for a non-trained step (identical for a whole group)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(shared_noise_seed(prompt, step_index, epoch))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(dtype)


def uses_shared_noise(step_index: int, selected_steps: Sequence[int] | None) -> bool:
    """Whether sampler step ``i`` draws prompt-shared noise (§6.2).

    ``selected_steps`` is the SubGRPO selection, or ``None`` when step selection is inactive
    (then every step uses fresh noise).  Trained (selected) steps always get fresh noise.
    """
    return selected_steps is not None and step_index not in selected_steps


def shared_noise_for_batch(
    prompts: Sequence[str],
    step_index: int,
    epoch: int,
    sample_shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[B, *sample_shape]`` stack of ``shared_step_noise`` for each prompt of a batch."""
    cache: dict[str, torch.Tensor] = {}
    rows = []
    for p in prompts:
        if p not in cache:
            cache[p] = shared_step_noise(p, step_index, epoch, sample_shape, dtype)
        rows.append(cache[p])
    return torch.stack(rows).to(device)
