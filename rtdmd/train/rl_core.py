r"""One RTDMD epoch: sampling → fake-score update → advantages → hybrid generator update.

This is the model-agnostic engine behind ``python -m rtdmd.train rl`` (:mod:`rtdmd.train.rl`
builds the networks, checkpoints and artifacts around it; :mod:`rtdmd.train.rl_terms` holds the
per-step generator loss terms, :mod:`rtdmd.train.rl_config` the model-free checks and reward
set-up, :mod:`rtdmd.train.rl_rollout` the sampler with log-probs).

Per epoch ``e`` (§8.4)::

    selected   = SubGRPO steps (§6.3)              ppo_steps = selected (or [] if policy_gradient off)
    aux_steps  = last_step.train_steps resolved    ([-1] -> {K-1}, the deterministic step)
    all_steps  = sorted(ppo_steps ∪ aux_steps)      G_eff = NB · |all_steps|

    1. NB sampling iterations (rtdmd.train.rl_rollout): latents x_0..x_K, logp_0..logp_{K-1}
    2. rewards r_k(x_K) for every {name: w_k} in rl.reward_weights (multi-scorer, no grad)
    3. fake-score update (§7.4), once, on all local samples, for every aux step j
       (s = σ_{j+1} = 0, x_s = x_{j+1}): the AC fake-score step shared with stage 1
       (:func:`rtdmd.algorithms.fake_score.ac_fake_score_terms`, same §5.2 clamp)
           L_fake = Σ_chunks (B_c/N_local) · ( L_AC + γ·L_cons )
       one optimizer step (:class:`rtdmd.train.optim.RoleOptimizer`, clip ‖∇‖ ≤ fake max_grad_norm).
    4. advantages (§6.4) on the gathered global batch (rank-major), weighted path:
           A = renorm( Σ_k w_k · (r_k − mean_prompt(r_k)) / (std(r_k) + 1e−4) ),  clamp ±adv_clip_max
       sliced back to this rank; rows with A = 0 exactly are dropped (kept count rounded up to a
       multiple of NB).
    5. generator update (§6.5, §7.2, §7.3, §7.5): NB sub-batches; for every j in all_steps one
       generator forward v = G(x_j, σ_j) and
           [j ∈ ppo]  L_PPO = mean_B max(−A·ratio, −A·clip(ratio, 1−ε_lt, 1+ε_gt)) + kl_beta·L_KL,
                      ratio = exp(logp(x_{j+1} | x_j; v) − logp_old)
           [j ∈ aux]  w_dm · L_DM(x̂0, x_f, x_r)  with x̂0 = x_j − σ_j v (grad), x_t = (1−t)x̂0 + t z,
                      x_r / x_f the teacher / fake back-projections to s = 0 (§5.6), and
                      L_bp = bp_grad_scale · mean_B relu(margin − R_w(decode(x̂0)))
           backward(loss_j / G_eff)
       then gradient all-reduce (mean over ranks), clip ‖∇‖ ≤ max_grad_norm, one AdamW step
       (the same :class:`~rtdmd.train.optim.RoleOptimizer` step as stage 1); the trainer then
       makes one policy-EMA update call.

How the loss weights map to the paper's β
-----------------------------------------
The paper descends ``∇KL(p_θ ‖ p_teacher) − β ∇E_{p_θ}[r]`` (reward-tilted target
``p_teacher·exp(β r)/Z``, §7.1).  There is no β key: dividing the objective by the DM weight
``w_dm = rl.last_step.weight`` puts the (gradient-normalised) DM term at unit weight and leaves

* pathwise (BP) branch, last deterministic step, hinge active (``R_w < margin``):
  ``β_bp = rl.bp.grad_scale / rl.last_step.weight`` per unit of the weighted BP reward
  ``R_w = Σ_k w_k R_k`` (released configs: 1e−4 / 1e−3 = 0.1);
* score-function (SubGRPO) branch, stochastic step j: at ratio 1
  ``∇L_PPO = −mean(A ∇logp_j)`` and the simplified log-prob's gradient is ``2ρ_j²/D`` times the
  exact Gaussian score, so ``β_ppo,j ≈ 2ρ_j² / (D · std(r) · w_dm)``
  (:func:`rtdmd.algorithms.rtdmd_objective.implied_ppo_beta`).

Both are logged (``beta/bp``, ``beta/ppo_step<j>``).  They are relative to the *normalised* DMD
gradient (§4.1), and Adam's per-parameter normalisation further rescales the total step, so
the paper's single β is an order-of-magnitude summary.  That is why the toy2d proof
(:mod:`rtdmd.eval.toy2d_rl_proof`) *fits* β: it measures the distance of the trained sampler to
``p·exp(β r)/Z`` over a small grid of β and reports the best fit (toy2d, ``params/toy2d.yaml``:
implied ``β_bp = 0.05 / 1.0 = 0.05``; best-fit ``β* = 0.1`` on the grid 0, 0.1, …, 1).  ``rl.kl_beta`` is the
unrelated KL-to-reference-policy coefficient (``grpo.beta`` of the reference, 0 in every config).

What the reference does differently (§12) and what we chose
------------------------------------------------------------
* §12.1/§12.3 bf16 master weights and EMA: the LoRA tensors, their AdamW state and the EMA shadow
  are fp32 (``rtdmd.train.roles`` casts the adapters); forwards run in
  ``distributed.mixed_precision``.  bf16 rounding of updates is not emulated.
* §12.2 LoRA re-init after merging the cold-start adapter: ``lora.reinit_after_merge``
  (``peft`` = A ~ N(0, 1/r²) default; ``reference`` = A ~ N(0, 1)).
* §12.4 EMA called per sub-batch: the reference calls ``ema.step(n)`` after every training
  sub-batch with the same optimizer-step count ``n``, so every ``interval``-th epoch the shadow
  receives NB identical updates (a delayed snapshot, retention 0.9^16 ≈ 0.19).  **We call it
  once per optimizer step** (``n`` = index of the step just taken), which gives the smooth
  average the EMA's warm-up formula was written for; with NB = 1 both coincide.
* §12.5 simplified log-prob + 1e−5 clip band: kept (``sampler.log_prob``).  With one optimizer
  step per epoch ratio ≡ 1 up to recomputation noise; ``clip_frac`` measures that noise.
* §12.9 one optimizer step per epoch: kept — ``G_eff = NB·|all_steps|`` backward calls, i.e. the
  reference's ``gradient_accumulation_steps = NB``.
* §12.10 "mean" reward is a weighted sum: kept (``R_w`` and the logged ``reward/mean``).
* §12.11 the prompt-batch splitter bug: not reproduced; items are strings or
  ``{"prompt"/"text", "metadata"}`` dicts.
* §12.12 EMA shards under FSDP: the checkpoint stores the *gathered* full shadow and resume
  re-shards it on every rank (``rtdmd.train.base``), so a multi-rank FSDP resume is correct.
* §12.13 evaluation samples with ``sampler.eta`` (0.9, stochastic) as the reference; §12.8 the τ
  clamp to [20, 980] is kept; §12.14 the EMA swap-in clones the live weights.
* Fresh sampling noise is drawn globally and sliced per rank (see ``rl_rollout``), so the
  samples do not depend on the number of processes; renoising ``τ``/``z`` and the teacher CFG
  scale come from generators seeded by (seed, epoch, rank) / (seed, epoch), so nothing needs a
  rank-0 broadcast and a resumed epoch re-draws the same values.
* Gradients are averaged across ranks explicitly after the whole epoch's backward calls
  (LoRA-only, small), instead of DDP hooks inside ``no_sync``; with FSDP the wrapper's own
  reduction is used (the caller passes ``grad_sync=None``).
* Per-term gradient norms (PPO, KL, DM, BP) are measured on the first sub-batch of a logged
  epoch by back-propagating the terms separately (their sum is the usual gradient); other
  sub-batches use one combined backward.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from rtdmd.algorithms import grpo
from rtdmd.algorithms.fake_score import ac_fake_score_terms
from rtdmd.algorithms.rtdmd_objective import (all_train_steps, grad_accum_divisor, implied_bp_beta, implied_ppo_beta,
                                              resolve_aux_steps)
from rtdmd.backbones.base import Backbone, Cond
from rtdmd.dist import Comm, LocalComm, derived_generator
from rtdmd.progress import progress
from rtdmd.train.optim import RoleOptimizer
from rtdmd.train.rl_config import (BPRewardNotDifferentiableError, RLConfigError, build_reward_fn,
                                   parse_prompt_items, resolve_bp_weights, validate_rl_config)
from rtdmd.train.rl_rollout import Rollout, rollout_with_log_probs, set_training
from rtdmd.train import rl_terms
from rtdmd.train.rl_terms import GeneratorTerms, adapters_disabled, unwrap

__all__ = ["RLNets", "RLEngine", "RLConfigError", "BPRewardNotDifferentiableError", "adapters_disabled"]


@dataclass
class RLNets:
    """Networks and optimizers of one RL run.

    ``generator`` / ``fake_score`` are what forwards go through (possibly DDP/FSDP-wrapped);
    ``gen_params`` / ``fake_params`` the trainable (LoRA) parameters by name; ``gen_opt`` /
    ``fake_opt`` their :class:`~rtdmd.train.optim.RoleOptimizer` (the trainer's).
    """

    teacher: nn.Module
    generator: nn.Module
    fake_score: nn.Module
    gen_params: dict[str, nn.Parameter]
    fake_params: dict[str, nn.Parameter]
    gen_opt: RoleOptimizer
    fake_opt: RoleOptimizer


class RLEngine(GeneratorTerms):
    """Runs RTDMD epochs; owns the sampler position, the stat tracker and the epoch counter."""

    def __init__(self, params, backbone: Backbone, nets: RLNets, *, prompts: Sequence[Any], comm: Comm | None = None,
                 reward_fn=None, bp_reward_fn=None, grad_sync: str | None = "all_reduce", reward_ckpt_dir=None,
                 autocast: Callable[[], Any] | None = None,
                 check_finite: Callable[[dict[str, torch.Tensor]], dict[str, float]] | None = None):
        self.params, self.rl, self.backbone, self.nets = params, params.rl, backbone, nets
        self.comm = comm or LocalComm()
        self.rank, self.world = self.comm.rank, self.comm.world_size
        validate_rl_config(params, self.world)
        self.sync = self.comm.all_reduce_mean_ if grad_sync == "all_reduce" else None
        self.grad_sync = grad_sync
        self.autocast = autocast or contextlib.nullcontext
        self.check_finite = check_finite
        self._init_data(params, prompts)
        self.sigmas = [float(s) for s in backbone.sigmas(params.sampler.step_list)]
        self.k = len(self.sigmas) - 1
        self.eta = float(params.sampler.eta)
        self.simplified = params.sampler.log_prob == "simplified"
        self._init_objective(params, reward_fn, bp_reward_fn, reward_ckpt_dir)
        self.tracker = grpo.PerPromptStatTracker(global_std=self.rl.global_std)
        self.eps_lt, self.eps_gt = float(self.rl.clip_range_low), float(self.rl.clip_range_high)
        self.epoch = 0
        self.global_step = 0  # generator optimizer steps
        self.uncond: Cond | None = None

    def _init_data(self, params, prompts) -> None:
        """Prompt items and the K-repeat sampler over them (§6.1)."""
        from rtdmd.data.samplers import KRepeatSampler

        rl = self.rl
        self.bs = params.per_rank(rl.global_sample_batch_size, self.world, "rl.global_sample_batch_size")
        self.nb = rl.num_batches_per_epoch
        self.prompts, self.metadata = parse_prompt_items(prompts)
        self.sampler = KRepeatSampler(len(self.prompts), self.bs, rl.num_images_per_prompt, self.world,
                                      self.rank, seed=rl.seed, num_batches_per_epoch=self.nb)

    def _init_objective(self, params, reward_fn, bp_reward_fn, ckpt_dir) -> None:
        """Rewards (advantages and BP), which loss terms are active, the aux steps (§7.2, §7.3)."""
        rl, backbone = self.rl, self.backbone
        domain = backbone.domain
        self.bp_weights, ignored = resolve_bp_weights(params)
        self.reward_fn = reward_fn or build_reward_fn(dict(rl.reward_weights), domain=domain,
                                                      device=str(backbone.device), ckpt_dir=ckpt_dir)
        self.bp_active = bool(rl.bp.enabled and rl.bp.grad_scale > 0 and self.bp_weights)
        self.warnings: list[str] = []
        if rl.bp.enabled and rl.bp.grad_scale > 0 and not self.bp_weights:
            self.warnings.append(f"rl.bp is enabled but none of the training rewards {list(rl.reward_weights)} is "
                                 "differentiable: reward back-propagation is off")
        if self.bp_active and ignored:
            self.warnings.append(f"rewards {ignored} are not differentiable: they feed the advantages only, not BP")
        for msg in self.warnings:
            warnings.warn(msg, stacklevel=3)
        self.bp_reward_fn = None
        if self.bp_active:
            self.bp_reward_fn = bp_reward_fn or build_reward_fn(self.bp_weights, domain=domain,
                                                                device=str(backbone.device), ckpt_dir=ckpt_dir)
        self.dm_active = rl.last_step.loss == "ac_dmd"
        self.aux_steps = (resolve_aux_steps(rl.last_step.train_steps, self.k)
                          if (self.dm_active or self.bp_active) else [])
        self.consistency = bool(rl.last_step.consistency and params.consistency.enabled
                                and params.consistency.weight > 0)

    # -------------------------------------------------------------------------------------- steps
    def train_steps(self, epoch: int) -> tuple[list[int], list[int]]:
        """``(ppo_steps, all_steps)`` of an epoch (§6.3, §7.2)."""
        rl = self.rl
        if not rl.policy_gradient:
            ppo: list[int] = []
        elif rl.step_selection.enabled:
            ss = rl.step_selection
            ppo = grpo.select_train_steps(rl.seed, epoch, ss.range_start, ss.range_end, ss.num_steps)
        else:
            ppo = grpo.fallback_train_steps(self.k, rl.timestep_fraction)
        return ppo, all_train_steps(ppo, self.aux_steps)

    def selected_for_noise(self, epoch: int) -> list[int] | None:
        """Steps that get fresh noise when step selection is on (None = all fresh)."""
        rl = self.rl
        if not rl.step_selection.enabled:
            return None
        ss = rl.step_selection
        return grpo.select_train_steps(rl.seed, epoch, ss.range_start, ss.range_end, ss.num_steps)

    # ------------------------------------------------------------------------------------ sampling
    def sample_epoch(self, epoch: int) -> Rollout:
        """NB sampling iterations with log-probs on this rank (advances the sampler)."""
        if (self.sampler.epoch, self.sampler.step) != (epoch, 0):
            raise RuntimeError(f"sampler position {(self.sampler.epoch, self.sampler.step)} does not match the "
                               f"start of epoch {epoch} (corrupt resume state?)")
        gen = self.nets.generator
        selected = self.selected_for_noise(epoch)
        parts = []
        it = iter(self.sampler)
        bar = progress(self.nb, f"rl rollout (epoch {epoch})", rank=self.rank, unit="batch", leave=False)
        for b in range(self.nb):
            idx = next(it)
            prompts = [self.prompts[i] for i in idx]
            cond = self.backbone.encode_prompts(prompts)
            with self.autocast():
                latents, logp = rollout_with_log_probs(
                    self.backbone, gen, prompts=prompts, cond=cond, sigmas=self.sigmas, eta=self.eta,
                    selected_steps=selected, epoch=epoch, iteration=b, seed=self.rl.seed, rank=self.rank,
                    world_size=self.world, simplified=self.simplified)
            parts.append(Rollout(prompts=prompts, indices=torch.tensor(idx, dtype=torch.long),
                                 metadata=[self.metadata[i] for i in idx], cond=cond, latents=latents,
                                 log_probs=logp))
            bar.update(1)
        bar.close()
        return Rollout.cat(parts)

    @torch.no_grad()
    def score(self, ro: Rollout) -> dict[str, torch.Tensor]:
        """Rewards of the final samples ``x_K``, decoded and scored one sampling batch at a time
        (§6.2: the reference scores each batch as it is sampled), so the decode's activations scale
        with the per-rank sampling batch, not with the ``NB``-times larger epoch."""
        md_any = any(m is not None for m in ro.metadata)
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, ro.batch_size, self.bs):
            stop = min(start + self.bs, ro.batch_size)
            images = self.decode(ro.latents[start:stop, -1])
            out = self.reward_fn(images, ro.prompts[start:stop], ro.metadata[start:stop] if md_any else None)
            del images
            for k, v in out.items():
                parts.setdefault(k, []).append(v.float().cpu())
        return {k: torch.cat(v) for k, v in parts.items()}

    # --------------------------------------------------------------------------------- fake score
    def fake_update(self, ro: Rollout, epoch: int) -> dict[str, float]:
        """§7.4: one AC (+ consistency) step of the fake score on all samples of the epoch."""
        opt = self.nets.fake_opt
        set_training(self.nets.fake_score, True)
        g = derived_generator("fake", self.rl.seed, epoch, self.rank)
        n = ro.batch_size
        chunk = self.rl.fake_score_batch_size or n
        opt.zero()
        tot, cons_tot = 0.0, 0.0
        for j in self.aux_steps:
            for sl in rl_terms.chunk_slices(n, chunk):
                rows = torch.arange(sl.start, sl.stop)
                terms, weights = self._fake_terms(ro, rows, j, g)
                values = self.check_finite(terms) if self.check_finite is not None else None
                if not values:
                    values = {k: float(v.detach()) for k, v in terms.items()}
                bc = rows.numel()
                tot += values["fake/ac"] * bc / n
                if "fake/consistency" in terms:
                    cons_tot += values["fake/consistency"] * bc / n
                opt.accumulate(terms, weights, scale=bc / n)
        gnorm = opt.step(sync=self.sync)["grad_norm"]
        opt.zero()  # free the gradients until the next epoch
        return {"fake/loss_ac": tot, "fake/loss_cons": cons_tot, "fake/grad_norm": gnorm}

    def _fake_terms(self, ro: Rollout, rows: torch.Tensor, j: int, g: torch.Generator):
        """The shared AC fake-score step on ``rows`` at aux step j (s = σ_{j+1}, x_s = x_{j+1})."""
        dev, s = self.backbone.device, self.sigmas[j + 1]
        x_s = ro.latents[rows, j + 1].to(dev)
        cond = ro.cond.index(rows.to(next(iter(ro.cond.tensors.values())).device))
        tau = self._renoise(s, rows.numel(), g)
        z = torch.randn(x_s.shape, generator=g).to(dev)
        fake = self.nets.fake_score

        def velocity(x, t):
            return self._velocity(fake, x, t, cond)

        terms, weights, _, _ = ac_fake_score_terms(
            velocity, x_s, s, tau, z, self.params.ac_dmd, eta=self.eta,
            cc=self.params.consistency if self.consistency else None, generator=g)
        return terms, weights

    # --------------------------------------------------------------------------------- advantages
    def advantages(self, ro: Rollout, rewards: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Global advantages (§6.4) sliced to this rank's rows, plus statistics."""
        rl = self.rl
        idx_all = self.comm.all_gather_cat(ro.indices.to(torch.long))
        prompts_all = [self.prompts[i] for i in idx_all.tolist()]
        names = list(rl.reward_weights)
        gathered = {k: self.comm.all_gather_cat(rewards[k].float()) for k in names}
        clip = rl.adv_clip_max if rl.adv_clip_max > 0 else None
        mean_all = sum(float(w) * gathered[k] for k, w in rl.reward_weights.items())
        if rl.weight_advantages:
            adv_all = grpo.group_advantages(prompts_all, gathered, weights=dict(rl.reward_weights),
                                            global_std=rl.global_std, clip=clip)
        else:
            adv_all = grpo.group_advantages(prompts_all, mean_all, global_std=rl.global_std, clip=clip)
        # the stat tracker keeps this epoch's history of the weighted reward (cleared every epoch, §6.4);
        # only the history is used (statistics, checkpoint), so no advantages are computed from it
        self.tracker.clear()
        self.tracker.record(prompts_all, mean_all)
        n = ro.batch_size
        adv = adv_all[self.rank * n:(self.rank + 1) * n]
        stats = {"adv/mean": adv_all.mean(), "adv/std": adv_all.std(unbiased=False), "adv/abs_mean": adv_all.abs().mean(),
                 "adv/min": adv_all.min(), "adv/max": adv_all.max(), "adv/zero_frac": (adv_all == 0).float().mean()}
        if clip is not None:
            stats["adv/clip_frac"] = (adv_all.abs() >= clip).float().mean()
        for k in names:
            stats[f"reward/{k}"] = gathered[k].mean()
        stats["reward/mean"] = mean_all.mean()
        stats = dict(zip(stats, torch.stack(list(stats.values())).tolist()))  # one device→host read
        ts = self.tracker.stats()
        stats["reward/group_size"] = ts["avg_group_size"]
        stats["reward/num_prompts"] = ts["num_prompts"]
        return adv, stats

    # ------------------------------------------------------------------------------ generator step
    def _sub_batches(self, ro: Rollout, adv: torch.Tensor, epoch: int, ppo_steps) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-advantage filter (§6.4), then a seeded permutation cut into NB sub-batches (§6.6)."""
        fg = derived_generator("filter", self.rl.seed, epoch, self.rank)
        keep = grpo.filter_zero_advantages(adv, self.nb, fg) if ppo_steps else torch.arange(ro.batch_size)
        return keep, keep[torch.randperm(keep.numel(), generator=fg)]

    def _teacher_scale(self, epoch: int) -> float:
        """Teacher CFG scale ``w ~ U[w_min, w_max]`` from (seed, epoch): identical on all ranks."""
        lo, hi = self.rl.teacher_guidance
        wg = derived_generator("cfg", self.rl.seed, epoch)
        return float(lo + (hi - lo) * torch.rand((), generator=wg)) if hi > lo else float(lo)

    def generator_update(self, ro: Rollout, adv: torch.Tensor, epoch: int, log: bool) -> dict[str, float]:
        """NB·|all_steps| backward calls, then one optimizer step (§6.5, §12.9)."""
        nets, opt = self.nets, self.nets.gen_opt
        ppo_steps, all_steps = self.train_steps(epoch)
        aux = set(self.aux_steps)
        g_eff = grad_accum_divisor(self.nb, len(all_steps))
        g = derived_generator("gen", self.rl.seed, epoch, self.rank)
        w_cfg = self._teacher_scale(epoch)
        keep, perm = self._sub_batches(ro, adv, epoch, ppo_steps)
        sub = perm.numel() // self.nb
        set_training(nets.generator, True)
        opt.zero()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        term_sq: dict[str, float] = {}
        # FSDP reduces gradients inside backward: skip the reduction on all but the last backward
        fsdp_sync = getattr(unwrap(nets.generator), "set_requires_gradient_sync", None) \
            if self.grad_sync is None else None
        split_ok = self.grad_sync is not None  # per-term autograd.grad is not used under FSDP
        n_back, total_back = 0, self.nb * len(all_steps)
        for bi in range(self.nb):
            rows = perm[bi * sub:(bi + 1) * sub]
            sro, sadv = ro.index(rows), adv[rows]
            for j in all_steps:
                terms, m = self._step_terms(sro, sadv, j, j in ppo_steps, j in aux, g, w_cfg)
                if self.check_finite is not None:
                    self.check_finite({f"gen/{k}": v_ for k, v_ in terms.items()})
                for k, v_ in m.items():
                    sums[k] = sums.get(k, 0.0) + v_
                    counts[k] = counts.get(k, 0) + 1
                n_back += 1
                if fsdp_sync is not None:
                    fsdp_sync(n_back == total_back)
                split = "accumulate" if log and bi == 0 and split_ok else None
                sq = opt.accumulate(terms, divisor=g_eff, term_norms=split)
                for name, v_ in sq.items():
                    term_sq[name] = term_sq.get(name, 0.0) + v_
        step = opt.step(sync=self.sync)
        opt.zero()  # free the gradients until the next epoch
        self.global_step += 1
        out = {k: sums[k] / counts[k] for k in sums}
        out.update({"gen/grad_norm": step["grad_norm"], "gen/kept_frac": float(keep.numel()) / ro.batch_size,
                    "gen/lr": step["lr"]})
        out.update({f"grad_norm/{name}": math.sqrt(sq) for name, sq in term_sq.items()})
        out.update({f"steps/selected_{j}": float(j in ppo_steps) for j in range(self.k)})
        return out

    # ---------------------------------------------------------------------------------- one epoch
    def run_epoch(self, log: bool = True) -> dict[str, float]:
        """Run epoch ``self.epoch`` and advance it; returns (local) metrics."""
        epoch = self.epoch
        t0 = time.perf_counter()
        ro = self.sample_epoch(epoch)
        rewards = self.score(ro)
        t_sample = time.perf_counter() - t0
        metrics: dict[str, float] = {}
        if self.dm_active and self.aux_steps:
            metrics.update(self.fake_update(ro, epoch))
        adv, astats = self.advantages(ro, rewards)
        metrics.update(astats)
        metrics.update(self.generator_update(ro, adv, epoch, log))
        metrics.update(self.beta_summary(rewards))
        metrics["time/sample"] = t_sample
        metrics["time/epoch"] = time.perf_counter() - t0
        self.epoch += 1
        return metrics

    def beta_summary(self, rewards: dict[str, torch.Tensor]) -> dict[str, float]:
        """Implied reward-tilt coefficients (module docstring); logged for reference."""
        rl = self.rl
        out: dict[str, float] = {}
        w_dm = rl.last_step.weight if self.dm_active else 0.0
        if w_dm <= 0:
            return out
        if self.bp_active:
            out["beta/bp"] = implied_bp_beta(rl.bp.grad_scale, w_dm)
        mean = sum(float(w) * rewards[k] for k, w in rl.reward_weights.items())
        std = float(mean.std(unbiased=False)) if mean.numel() > 1 else 0.0
        d = int(torch.tensor(self.backbone.latent_shape(1)[1:]).prod())
        theta = self.eta * math.pi / 2
        if std > 0 and rl.policy_gradient:
            for j in range(self.k - 1):
                rho = self.sigmas[j + 1] * math.sin(theta)
                out[f"beta/ppo_step{j}"] = implied_ppo_beta(rho, d, std, w_dm)
        return out

    # -------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Engine state for exact resume (the trainer adds networks, optimizers, EMA)."""
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "sampler": self.sampler.state_dict(),
            "stat_tracker": self.tracker.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.tracker.load_state_dict(state["stat_tracker"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        if (self.sampler.epoch, self.sampler.step) != (self.epoch, 0):
            raise ValueError(f"checkpoint sampler position {(self.sampler.epoch, self.sampler.step)} does not match "
                             f"its epoch {self.epoch}")
