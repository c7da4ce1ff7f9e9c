r"""Stage-2 (RTDMD) rollout with transition log-probabilities (algorithm.md §6.1–§6.3).

One *sampling iteration* ``b`` of epoch ``e`` on rank ``r`` of ``W``:

1. Prompts: the K-repeat sampler (:class:`rtdmd.data.samplers.KRepeatSampler`) gives every rank
   the same global list of ``W·bs`` dataset indices, ``M = W·bs/K`` prompts each repeated
   ``K`` times and permuted; rank ``r`` takes rows ``[r·bs, (r+1)·bs)``.  Groups are therefore
   complete over the *global* batch whatever ``W`` is (invariant 22).
2. Schedule ``σ_0 > … > σ_{K−1} > σ_K = 0`` from the backbone (§1.4); the network is queried
   at ``σ_i`` (the backbone converts to its model timestep).
3. ``x_0 ~ N(0, I)``; for ``i = 0..K−1``: ``v_i = G(x_i, σ_i)`` (no CFG), then the stateless
   CPS step of §2.2::

       μ_i = (1 − σ_{i+1})·x̂0 + σ_{i+1}·cos θ·ε̂,   ρ_i = σ_{i+1}·sin θ,   x_{i+1} = μ_i + ρ_i·ξ_i
       logp_i = − mean_D (x_{i+1} − μ_i)²           (simplified; ``sampler.log_prob: exact`` uses
                                                     mean_D log N(x_{i+1}; μ_i, ρ_i²))

   with ``ξ_i`` the **prompt-shared** noise (seed ``(H(prompt) + 10007·i + e·100000) mod 2^31``,
   :func:`rtdmd.algorithms.grpo.shared_step_noise`) when SubGRPO step selection is active and
   ``i`` is not a selected step, and fresh noise otherwise.  The last step (``σ_K = 0``) is the
   deterministic Euler step (``ρ = 0``, ``logp = 0``).
4. The clean sample ``x_K`` is decoded (identity for toy2d) and scored.

Stored per sample: ``latents[:, 0..K]`` and ``log_probs[:, 0..K−1]`` (sampling-time values,
the ``old_log_prob`` of PPO).

Departures from the reference (deliberate)
------------------------------------------
* **Fresh noise is world-size invariant.**  The reference draws ``x_0`` and the fresh ``ξ`` from
  each rank's device RNG.  Here they are drawn for the whole *global* batch from a CPU generator
  seeded by ``(seed, epoch, iteration, step)`` and each rank keeps its own rows
  (:func:`global_randn`).  The same global config therefore produces bit-identical samples with
  1, 2 or 4 processes (tested), and a resumed run needs no RNG state to re-create them.  The
  cost is drawing ``W·bs`` instead of ``bs`` noise tensors per step (CPU ``randn``; negligible
  next to a transformer forward).
* ``same_latent`` (per-prompt shared ``x_0``) is not offered: every released config has it off.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from rtdmd.algorithms.cps import cps_step_with_log_prob
from rtdmd.algorithms.grpo import shared_noise_for_batch, uses_shared_noise
from rtdmd.backbones.base import Backbone, Cond
from rtdmd.dist import derive_seed

_SUBMODULES: "weakref.WeakKeyDictionary[nn.Module, list[dict] | None]" = weakref.WeakKeyDictionary()


def set_training(net: nn.Module, mode: bool) -> None:
    """``net.train(mode)`` without its recursive walk through ``Module.__setattr__``: the
    ``training`` attribute of every submodule (listed once per net — the RL engine's nets do not
    change structure after setup) is written directly. Nets with a submodule that overrides
    ``train`` or does not keep ``training`` as a plain attribute use ``net.train(mode)``."""
    dicts = _SUBMODULES.get(net, ())
    if dicts == ():
        mods = list(net.modules())
        plain = all(type(m).train is nn.Module.train and "training" in vars(m) for m in mods)
        dicts = _SUBMODULES[net] = [vars(m) for m in mods] if plain else None
    if dicts is None:
        net.train(mode)
        return
    mode = bool(mode)
    for d in dicts:
        d["training"] = mode

__all__ = ["derive_seed", "global_randn", "Rollout", "rollout_with_log_probs"]


def global_randn(
    global_batch: int,
    sample_shape: Sequence[int],
    rows: slice,
    seed: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rows ``rows`` of a ``[global_batch, *sample_shape]`` standard normal drawn from ``seed``.

    Every rank draws the same global tensor and keeps its slice, so the values a sample gets
    depend only on its global position, never on the number of processes.
    """
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    full = torch.randn((int(global_batch), *[int(s) for s in sample_shape]), generator=g, dtype=torch.float32)
    return full[rows].to(device=device, dtype=dtype)


@dataclass
class Rollout:
    """The samples of one (or several concatenated) sampling iterations on this rank."""

    prompts: list[str]
    indices: torch.Tensor  # [B] int64 dataset indices (group keys are the prompt strings)
    metadata: list
    cond: Cond
    latents: torch.Tensor  # [B, K+1, *sample_shape] fp32
    log_probs: torch.Tensor  # [B, K] fp32 (sampling-time logp; 0 on the deterministic last step)

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    def index(self, idx: torch.Tensor) -> "Rollout":
        """Rows ``idx`` (a CPU int64 tensor) of every per-sample field."""
        rows = idx.tolist()
        dev = self.latents.device
        return Rollout(
            prompts=[self.prompts[i] for i in rows],
            indices=self.indices[idx],
            metadata=[self.metadata[i] for i in rows],
            cond=self.cond.index(idx.to(next(iter(self.cond.tensors.values())).device)),
            latents=self.latents[idx.to(dev)],
            log_probs=self.log_probs[idx.to(dev)],
        )

    @staticmethod
    def cat(parts: Sequence["Rollout"]) -> "Rollout":
        return Rollout(
            prompts=[p for r in parts for p in r.prompts],
            indices=torch.cat([r.indices for r in parts]),
            metadata=[m for r in parts for m in r.metadata],
            cond=Cond.cat([r.cond for r in parts]),
            latents=torch.cat([r.latents for r in parts]),
            log_probs=torch.cat([r.log_probs for r in parts]),
        )


@torch.no_grad()
def rollout_with_log_probs(
    backbone: Backbone,
    net: nn.Module,
    *,
    prompts: Sequence[str],
    cond: Cond,
    sigmas: Sequence[float],
    eta: float,
    selected_steps: Sequence[int] | None,
    epoch: int,
    iteration: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    simplified: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the few-step CPS sampler with log-probs (§6.2) → ``(latents [B,K+1,...], log_probs [B,K])``.

    ``selected_steps`` is the SubGRPO selection (``None`` = step selection off: every step draws
    fresh noise).  ``prompts`` are this rank's ``B`` prompts; fresh noise is drawn for the global
    ``world_size·B`` batch and sliced to rows ``[rank·B, (rank+1)·B)``.
    """
    prompts = list(prompts)
    b = len(prompts)
    if cond.batch_size != b:
        raise ValueError(f"cond has batch {cond.batch_size} but there are {b} prompts")
    k = len(sigmas) - 1
    if k < 1 or float(sigmas[-1]) != 0.0:
        raise ValueError(f"sigmas must be K+1 values ending in 0, got {list(sigmas)}")
    shape = tuple(backbone.latent_shape(b))
    sample_shape = shape[1:]
    rows = slice(rank * b, (rank + 1) * b)
    dev = backbone.device
    gb = world_size * b

    x = global_randn(gb, sample_shape, rows, derive_seed("x0", seed, epoch, iteration), device=dev)
    latents = [x]
    log_probs = []
    was_training = net.training
    set_training(net, False)
    try:
        for i in range(k):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            sig = torch.full((b,), s, device=dev, dtype=torch.float32)
            v = backbone.velocity(net, x.to(backbone.dtype), sig, cond).float()
            if s_next == 0.0 or eta == 0.0:
                noise = None
            elif uses_shared_noise(i, selected_steps):
                noise = shared_noise_for_batch(prompts, i, epoch, sample_shape, device=dev)
            else:
                noise = global_randn(gb, sample_shape, rows, derive_seed("xi", seed, epoch, iteration, i), device=dev)
            nxt, logp, _, _ = cps_step_with_log_prob(x, v, s, s_next, eta, noise=noise, simplified=simplified)
            x = nxt.float()
            latents.append(x)
            log_probs.append(logp.float())
    finally:
        set_training(net, was_training)
    return torch.stack(latents, dim=1), torch.stack(log_probs, dim=1)
