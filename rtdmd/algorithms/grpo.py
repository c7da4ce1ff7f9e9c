"""GRPO / SubGRPO math for stage 2 (spec: algorithm.md §6.2-§6.5, invariants 19-21, 23, 24).

Pure tensor / python functions: no model code, no I/O, no process-global RNG.

Equations implemented
---------------------
* Group advantages (§6.4), ``group_advantages`` / ``PerPromptStatTracker``::

      A_i = (r_i - mean_{j: p_j = p_i} r_j) / (std + eps)           eps = 1e-4

  ``std`` is the *population* std (``unbiased=False``) of the whole batch when
  ``global_std=True`` and of the prompt's own group otherwise.  Rewards in a group that are all
  identical give exactly ``0`` (the group mean is computed as ``r_first + mean(r - r_first)``, so
  the centred values are exactly zero, not merely rounding-small).

* Weighted-advantage path (``weight_advantages = true`` in every released config)::

      A_k = per-prompt normalisation of reward k      (as above, per reward)
      A   = sum_k w_k A_k
      A   = (A - mean(A)) / (std(A) + eps)             (global, population std)

  The reference tiles rewards to ``[N, T]`` (one identical column per sampler step) before the
  global renormalisation; because the columns are identical, the mean and population std over
  ``N*T`` entries equal those over ``N``, so this module works on ``[N]`` and
  ``expand_to_steps`` does the tiling afterwards (bit-identical result).

* PPO clipped surrogate (§6.5), ``ppo_loss``::

      ratio  = exp(logp_new - logp_old)
      L_clip = mean_B max(-A * ratio, -A * clamp(ratio, 1 - eps_lt, 1 + eps_gt))

* Optional KL to a reference policy (§6.5), ``kl_to_reference``::

      L_KL = mean_B mean_D (mu - mu_ref)^2 / (2 rho^2)      (0 if min rho == 0)

* Step selection (§6.3), ``select_train_steps``::

      sorted(random.Random(seed + epoch*100000 + 104729).sample(range(lo, hi + 1), n))

  and the fallback ``{0, ..., int(K * timestep_fraction) - 1}`` (``fallback_train_steps``).

* Prompt-shared noise for non-trained steps (§6.2), ``shared_step_noise``: CPU generator seeded
  ``(H(prompt) + 10007*i + epoch*100000) mod 2^31`` with ``H`` = first 4 bytes of
  SHA-256(utf-8 prompt), big-endian.

* Zero-advantage filter (§6.4, last bullet), ``filter_zero_advantages``.

Deliberate departures from the reference
----------------------------------------
1. **Singleton prompts.**  ``K_g = 1 disables per-prompt tracking`` (spec §6.4): a prompt that
   occurs once in a call is normalised against the whole batch, ``(r - mean_all) /
   (std_all + eps)``.  When every prompt is a singleton this *is* the reference's tracking-off
   path.  In a mixed batch (only possible if the K-repeat sampler is bypassed) the reference
   tracker would give the singleton exactly 0 advantage (mean of a 1-element history is the
   reward itself) and the sample would be thrown away by the zero-advantage filter; we keep its
   signal instead, on the batch scale.
2. **Where ``adv_clip_max`` is applied.**  ``group_advantages(..., clip=c)`` clamps to
   ``[-c, c]`` as the very last operation (after the global renormalisation).  The reference
   clamps inside the PPO loss (``A_c = clamp(A[:, j])``).  Advantages are only consumed by the PPO
   loss and by the zero-advantage filter; clamping preserves sign and exact zeros, so the two
   are equivalent.  ``ppo_loss`` therefore does **not** clamp again.
3. **Internal precision.**  Advantages are computed in float64 and returned in the rewards'
   floating dtype (float32 for integer / low-precision input).  The reference uses numpy
   float64/32 mixtures; differences are at rounding level.
4. **Shared noise dtype.**  Noise is always drawn as float32 from the CPU generator and then cast
   to ``dtype``; values therefore do not depend on the requested dtype.
5. **Stat tracker** is scalar-reward only; the weighted path is stateless (``group_advantages``
   with a dict).  This is equivalent because the reference clears the tracker after every
   epoch and calls it once per epoch with the complete gathered batch.  ``load_state_dict``
   refuses a state whose ``global_std`` differs from the tracker's (config drift on resume).
6. ``filter_zero_advantages`` requires ``N % num_batches == 0`` (always true for the K-repeat
   sampler, where ``N_local = NB * bs``) so that rounding up to a multiple of ``NB`` by
   re-adding dropped rows is always possible; otherwise it raises instead of guessing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rtdmd.algorithms.subgrpo import (fallback_train_steps, prompt_hash, select_train_steps, shared_noise_for_batch,
                                     shared_noise_seed, shared_step_noise, uses_shared_noise)

__all__ = [
    "ADV_EPS",
    "group_advantages",
    "expand_to_steps",
    "ppo_loss",
    "resolve_clip_range",
    "kl_to_reference",
    "PerPromptStatTracker",
    "select_train_steps",
    "fallback_train_steps",
    "prompt_hash",
    "shared_noise_seed",
    "shared_step_noise",
    "shared_noise_for_batch",
    "uses_shared_noise",
    "filter_zero_advantages",
]

ADV_EPS = 1e-4


# ----------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------


def _out_dtype(*tensors: torch.Tensor) -> torch.dtype:
    if tensors and all(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _check_rewards(rewards: torch.Tensor, n: int, name: str = "rewards") -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(rewards.shape)}")
    if rewards.shape[0] != n:
        raise ValueError(f"{name} has {rewards.shape[0]} entries but there are {n} prompts")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"{name} contains non-finite values")
    return rewards


def _group_ids(prompts: Sequence[str]) -> tuple[list[int], int]:
    index: dict[str, int] = {}
    ids = [index.setdefault(p, len(index)) for p in prompts]
    return ids, len(index)


def _population_std(x: torch.Tensor) -> torch.Tensor:
    return x.std(unbiased=False) if x.numel() > 1 else torch.zeros((), dtype=x.dtype, device=x.device)


def _normalise(
    ids: torch.Tensor,
    num_groups: int,
    values: torch.Tensor,
    current: slice,
    global_std: bool,
    eps: float,
) -> torch.Tensor:
    """Per-group normalisation in float64.

    ``ids``/``values`` cover the group history (earlier entries) followed by the current batch
    (``values[current]``).  Group statistics use all entries of a group; batch statistics
    (global std, singleton fallback) use the current batch only.  Returns advantages for the
    current batch.
    """
    v = values.to(torch.float64)
    counts = torch.bincount(ids, minlength=num_groups)
    # First entry of every group: the shift that makes identical groups centre to exactly 0.
    pos = torch.arange(ids.numel(), device=ids.device)
    first = torch.full((num_groups,), ids.numel(), dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, ids, pos, reduce="amin")
    shift = v[first][ids]
    d = v - shift
    mean_d = torch.zeros(num_groups, dtype=torch.float64, device=v.device).index_add_(0, ids, d)
    mean_d = mean_d / counts.to(torch.float64)
    centred = d - mean_d[ids]

    cur = v[current]
    cur_centred = centred[current]
    cur_ids = ids[current]
    if global_std:
        std = _population_std(cur).expand_as(cur)
    else:
        var = torch.zeros(num_groups, dtype=torch.float64, device=v.device).index_add_(
            0, ids, centred * centred
        )
        std = torch.sqrt(var / counts.to(torch.float64))[cur_ids]
    adv = cur_centred / (std + eps)

    singleton = counts[cur_ids] == 1
    if singleton.any():
        batch_centred = cur - cur.mean()
        batch_adv = batch_centred / (_population_std(cur) + eps)
        adv = torch.where(singleton, batch_adv, adv)
    return adv


def _per_prompt(prompts: Sequence[str], rewards: torch.Tensor, global_std: bool, eps: float) -> torch.Tensor:
    ids, g = _group_ids(prompts)
    ids_t = torch.tensor(ids, dtype=torch.long, device=rewards.device)
    return _normalise(ids_t, g, rewards, slice(0, len(ids)), global_std, eps)


def group_advantages(
    prompts: Sequence[str],
    rewards: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    weights: Mapping[str, float] | None = None,
    global_std: bool = False,
    clip: float | None = None,
    eps: float = ADV_EPS,
) -> torch.Tensor:
    """Advantages ``[N]`` for one complete set of groups (the whole gathered epoch batch).

    ``prompts`` are the group keys.  ``rewards`` is either a 1-D tensor (plain per-prompt
    normalisation, the reference's ``weight_advantages = false`` path when given
    ``combine_rewards(...)``) or a dict ``{name: [N]}`` together with ``weights={name: w}``
    (the weighted-advantage path: per-reward normalisation, weighted sum, global
    renormalisation).  For a dict, the rewards named in ``weights`` are used (every one must be
    present); extra entries in ``rewards`` (e.g. an aggregate ``"mean"``) are ignored.

    ``clip`` (``adv_clip_max``) clamps the final advantages to ``[-clip, clip]``.
    """
    prompts = list(prompts)
    n = len(prompts)
    if n == 0:
        raise ValueError("group_advantages needs at least one sample")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be positive, got {clip}")

    if isinstance(rewards, Mapping):
        if weights is None:
            raise ValueError("a dict of rewards needs explicit weights={name: weight}")
        if not weights:
            raise ValueError("weights is empty")
        missing = [k for k in weights if k not in rewards]
        if missing:
            raise KeyError(f"rewards missing for weighted keys {missing}; have {sorted(rewards)}")
        tensors = {k: _check_rewards(rewards[k], n, f"rewards[{k!r}]") for k in weights}
        out_dtype = _out_dtype(*tensors.values())
        total = None
        for k, w in weights.items():
            a_k = _per_prompt(prompts, tensors[k], global_std, eps)
            total = a_k * float(w) if total is None else total + a_k * float(w)
        assert total is not None
        adv = (total - total.mean()) / (_population_std(total) + eps)
    else:
        if weights is not None:
            raise ValueError("weights= is only meaningful with a dict of rewards")
        r = _check_rewards(rewards, n)
        out_dtype = _out_dtype(r)
        adv = _per_prompt(prompts, r, global_std, eps)

    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.to(out_dtype)


def expand_to_steps(advantages: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Tile ``[N]`` advantages to the reference's ``[N, T]`` layout (identical columns)."""
    if advantages.dim() != 1:
        raise ValueError("expected [N] advantages")
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    return advantages.unsqueeze(1).expand(-1, num_steps).contiguous()


class PerPromptStatTracker:
    """Per-prompt reward history -> advantages (data_and_eval.md §3, algorithm.md §6.4).

    ``update`` appends each prompt's rewards to its history and returns
    ``(r - mean(history_p)) / (std + eps)`` with ``std`` = population std of the current batch
    (``global_std=True``) or of the prompt's history.  A prompt whose history holds a single
    reward is normalised against the current batch (see module docstring, departure 1).
    With a freshly cleared tracker, ``update`` equals ``group_advantages`` exactly.
    """

    def __init__(self, global_std: bool, eps: float = ADV_EPS) -> None:
        self.global_std = bool(global_std)
        self.eps = float(eps)
        self._history: dict[str, list[float]] = {}

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        prompts = list(prompts)
        if not prompts:
            raise ValueError("update needs at least one sample")
        r = _check_rewards(rewards, len(prompts))
        out_dtype = _out_dtype(r)

        prior_prompts: list[str] = []
        prior_values: list[float] = []
        for p in dict.fromkeys(prompts):
            hist = self._history.get(p, [])
            prior_prompts.extend([p] * len(hist))
            prior_values.extend(hist)
        all_prompts = prior_prompts + prompts
        ids, g = _group_ids(all_prompts)
        ids_t = torch.tensor(ids, dtype=torch.long, device=r.device)
        values = torch.cat(
            [torch.tensor(prior_values, dtype=torch.float64, device=r.device), r.to(torch.float64)]
        )
        adv = _normalise(ids_t, g, values, slice(len(prior_values), len(all_prompts)), self.global_std, self.eps)
        self._append(prompts, r)
        return adv.to(out_dtype)

    def record(self, prompts: Sequence[str], rewards: torch.Tensor) -> None:
        """Append to the history exactly as :meth:`update` does, without computing advantages
        (for a caller that only needs the history: its statistics, its checkpointed state)."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("record needs at least one sample")
        self._append(prompts, _check_rewards(rewards, len(prompts)))

    def _append(self, prompts: list[str], r: torch.Tensor) -> None:
        for p, v in zip(prompts, r.detach().to(torch.float64).cpu().tolist()):
            self._history.setdefault(p, []).append(float(v))

    def clear(self) -> None:
        self._history.clear()

    def stats(self, top_fraction: float = 0.1) -> dict[str, float]:
        """Average group size, number of distinct prompts, mean of the top ``top_fraction``."""
        if not 0 < top_fraction <= 1:
            raise ValueError("top_fraction must be in (0, 1]")
        sizes = [len(v) for v in self._history.values()]
        values = sorted((x for v in self._history.values() for x in v), reverse=True)
        k = max(1, math.ceil(top_fraction * len(values))) if values else 0
        return {
            "avg_group_size": float(sum(sizes) / len(sizes)) if sizes else 0.0,
            "num_prompts": float(len(sizes)),
            "top_reward_mean": float(sum(values[:k]) / k) if k else 0.0,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (same fields as the reference's ``grpo_state_rank<r>``)."""
        return {
            "stats": {p: list(v) for p, v in self._history.items()},
            "history_prompts": list(self._history.keys()),
            "global_std": self.global_std,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if bool(state["global_std"]) != self.global_std:
            raise ValueError(
                f"stat tracker state has global_std={state['global_std']} but the tracker was "
                f"built with global_std={self.global_std}"
            )
        stats = state["stats"]
        order = list(state.get("history_prompts", stats.keys()))
        if set(order) != set(stats.keys()):
            raise ValueError("history_prompts does not match the keys of stats")
        self._history = {str(p): [float(x) for x in stats[p]] for p in order}


# ----------------------------------------------------------------------------------------------
# PPO objective
# ----------------------------------------------------------------------------------------------


def resolve_clip_range(clip_range: float, clip_range_lt: float = 0.0, clip_range_gt: float = 0.0) -> tuple[float, float]:
    """``(eps_lt, eps_gt)``: the side-specific value if > 0, else ``clip_range`` (§6.5)."""
    lo = clip_range_lt if clip_range_lt > 0 else clip_range
    hi = clip_range_gt if clip_range_gt > 0 else clip_range
    if lo <= 0 or hi <= 0:
        raise ValueError(f"clip ranges must be positive, got lt={lo}, gt={hi}")
    return float(lo), float(hi)


def ppo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped PPO surrogate ``mean_B max(-A r, -A clamp(r, 1-clip_low, 1+clip_high))``.

    ``advantages`` are used as given (clamp them beforehand, e.g. ``group_advantages(clip=)``).
    Gradient w.r.t. ``ratio``: 0 when ``A>0, r>1+clip_high`` or ``A<0, r<1-clip_low``,
    ``-A/B`` otherwise (at ``r = 1`` both branches tie and their halves add up to ``-A/B``).
    Metrics are python floats: ``clip_frac``, ``approx_kl`` (``0.5 mean (new-old)^2``),
    ``ratio_mean``, ``ratio_min``, ``ratio_max``.
    """
    if log_prob.shape != old_log_prob.shape or log_prob.shape != advantages.shape:
        raise ValueError(
            f"shape mismatch: log_prob {tuple(log_prob.shape)}, old {tuple(old_log_prob.shape)}, "
            f"advantages {tuple(advantages.shape)}"
        )
    if clip_low <= 0 or clip_high <= 0:
        raise ValueError("clip_low and clip_high must be positive")
    old = old_log_prob.detach()
    adv = advantages.detach().to(log_prob.dtype)
    diff = log_prob - old
    ratio = torch.exp(diff)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped).mean()

    with torch.no_grad():
        r = ratio.detach()
        outside = (r < 1.0 - clip_low) | (r > 1.0 + clip_high)
        names = ("clip_frac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max")
        vals = torch.stack([outside.to(torch.float32).mean(), (0.5 * diff.detach() ** 2).mean(),
                            r.mean(), r.min(), r.max()])
        metrics = dict(zip(names, vals.tolist()))  # one device→host read (an fp32 value widens exactly)
    return loss, metrics


def kl_to_reference(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """``mean_B mean_D (mu - mu_ref)^2 / (2 rho^2)``; exactly 0 if ``min rho == 0``.

    ``mean``/``ref_mean``: ``[B, ...]``; ``std``: scalar or broadcastable (``[B,1,1,1]``).
    ``ref_mean`` is treated as a constant (detached).
    """
    if mean.shape != ref_mean.shape:
        raise ValueError(f"shape mismatch {tuple(mean.shape)} vs {tuple(ref_mean.shape)}")
    std_t = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    if std_t.min().item() <= 0:
        return torch.zeros((), dtype=mean.dtype, device=mean.device)
    per_elem = ((mean - ref_mean.detach()) ** 2 / (2.0 * std_t**2)).expand_as(mean)
    return per_elem.reshape(mean.shape[0], -1).mean(dim=1).mean()


# ----------------------------------------------------------------------------------------------
# Zero-advantage filter
# ----------------------------------------------------------------------------------------------


def filter_zero_advantages(adv: torch.Tensor, num_batches: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted row indices to keep (§6.4).

    Keep rows with ``sum_cols |A| != 0``; if none survive keep ``num_batches`` random rows; if the
    kept count is not a multiple of ``num_batches`` re-add random dropped rows until it is.
    ``generator`` (CPU) should be seeded from epoch and rank by the caller.  The returned
    ``int64`` indices live on the CPU whatever the device of ``adv``.
    """
    if adv.dim() not in (1, 2):
        raise ValueError("adv must be [N] or [N, T]")
    if num_batches < 1:
        raise ValueError("num_batches must be >= 1")
    n = adv.shape[0]
    if n % num_batches != 0:
        raise ValueError(f"N={n} rows is not a multiple of num_batches={num_batches}")
    a = adv.detach().abs()
    score = a if a.dim() == 1 else a.sum(dim=1)
    keep = (score != 0).cpu()
    kept = torch.nonzero(keep).flatten()
    dropped = torch.nonzero(~keep).flatten()
    if kept.numel() == 0:
        pick = torch.randperm(n, generator=generator)[:num_batches]
        return torch.sort(pick).values
    short = (-kept.numel()) % num_batches
    if short:
        extra = dropped[torch.randperm(dropped.numel(), generator=generator)[:short]]
        kept = torch.cat([kept, extra])
    return torch.sort(kept).values
