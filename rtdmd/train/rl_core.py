r"""One RTDMD epoch: sampling → fake-score update → advantages → hybrid generator update.

This is the model-agnostic engine behind ``python -m rtdmd.train rl`` (:mod:`rtdmd.train.rl`
builds the networks, checkpoints and artifacts around it).  Section numbers refer to
``algorithm.md``.

Per epoch ``e`` (§8.4)::

    selected   = SubGRPO steps (§6.3)              ppo_steps = selected (or [] if policy_gradient off)
    aux_steps  = last_step.train_steps resolved    ([-1] -> {K-1}, the deterministic step)
    all_steps  = sorted(ppo_steps ∪ aux_steps)      G_eff = NB · |all_steps|

    1. NB sampling iterations (rtdmd.train.rl_rollout): latents x_0..x_K, logp_0..logp_{K-1}
    2. rewards r_k(x_K) for every {name: w_k} in rl.reward_weights (multi-scorer, no grad)
    3. fake-score update (§7.4), once, on all local samples, for every aux step j
       (s = σ_{j+1} = 0, x_s = x_{j+1}):
           τ ~ U[N s + offset, end] clamped, t = τ/N, x_t = a x_s + σ_ts z
           L_fake = Σ_chunks (B_c/N_local) · ( mean[w (scale·v_φ(x_t) − T')²] + γ·L_cons )
       one AdamW step (clip ‖∇‖ ≤ fake max_grad_norm).
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
       then gradient all-reduce (mean over ranks), clip ‖∇‖ ≤ max_grad_norm, one AdamW step,
       one policy-EMA update call.

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
from rtdmd.algorithms.ac_dmd import (
    ac_fake_loss,
    ac_generator_loss,
    renoise_timesteps,
    subinterval_forward,
    subinterval_target,
)
from rtdmd.algorithms.consistency import consistency_loss
from rtdmd.algorithms.cps import cps_log_prob, cps_mean_std, cps_step
from rtdmd.algorithms.reward_bp import bp_hinge_loss
from rtdmd.algorithms.rtdmd_objective import (
    all_train_steps,
    bp_applies,
    grad_accum_divisor,
    implied_bp_beta,
    implied_ppo_beta,
    resolve_aux_steps,
)
from rtdmd.backbones.base import Backbone, Cond
from rtdmd.dist import Comm, LocalComm, derive_seed, full_tensor
from rtdmd.rewards.errors import RewardNotDifferentiableError
from rtdmd.train.rl_rollout import Rollout, rollout_with_log_probs

__all__ = ["RLNets", "RLEngine", "resolve_bp_weights", "build_reward_fn",
           "build_reward_check", "BPRewardNotDifferentiableError",
           "adapters_disabled", "RLConfigError"]

N_TRAIN = 1000.0


class RLConfigError(ValueError):
    """An RL setting that cannot work (named, with the fix)."""


class BPRewardNotDifferentiableError(RLConfigError, RewardNotDifferentiableError):
    """A non-differentiable reward requested for back-propagation: a config mistake (the CLI
    exits 2) that is also a :class:`rtdmd.rewards.RewardNotDifferentiableError`."""


# ----------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------
def resolve_bp_weights(params) -> tuple[dict[str, float], list[str]]:
    """BP reward weights ``{name: w}`` and the training rewards ignored for BP (§7.3).

    ``rl.bp.rewards`` empty: the differentiable subset of ``rl.reward_weights`` (the reference's
    ``bp_use_training_reward_fn``); non-differentiable ones are returned as ignored (they still
    feed the advantages).  ``rl.bp.rewards`` given: every name must exist and be differentiable,
    otherwise a clear error.
    """
    from rtdmd.rewards import UnknownRewardError, list_scorers

    infos = list_scorers()
    rl = params.rl
    valid = ", ".join(infos)
    for name in list(rl.reward_weights) + list(rl.bp.rewards):
        if name not in infos:
            raise UnknownRewardError(f"unknown reward '{name}' in the rl config; valid rewards: {valid}")
    differentiable = [n for n, i in infos.items() if i.differentiable]
    if rl.bp.rewards:
        bad = [n for n in rl.bp.rewards if not infos[n].differentiable]
        if bad:
            raise BPRewardNotDifferentiableError(
                f"rl.bp.rewards requests {bad} for reward back-propagation, but "
                f"{'it is' if len(bad) == 1 else 'they are'} not differentiable (they can only feed the "
                f"advantages via rl.reward_weights); differentiable rewards: {', '.join(differentiable)}"
            )
        return {n: float(w) for n, w in rl.bp.rewards.items() if w != 0}, []
    kept = {n: float(w) for n, w in rl.reward_weights.items() if w != 0 and infos[n].differentiable}
    ignored = [n for n, w in rl.reward_weights.items() if w != 0 and not infos[n].differentiable]
    return kept, ignored


def build_reward_check(weights: dict[str, float], domain: str) -> None:
    """Every reward must exist (the error lists the valid ones) and score ``domain`` inputs."""
    from rtdmd.rewards import UnknownRewardError, list_scorers

    infos = list_scorers()
    unknown = [n for n in weights if n not in infos]
    if unknown:
        raise UnknownRewardError(f"unknown reward(s) {unknown} in the rl config; valid rewards: {', '.join(infos)}")
    wrong = [n for n in weights if infos[n].domain != domain]
    if wrong:
        raise RLConfigError(
            f"rewards {wrong} score '{infos[wrong[0]].domain}' inputs but this backbone produces "
            f"'{domain}'; choose rewards of domain '{domain}': "
            f"{', '.join(n for n, i in infos.items() if i.domain == domain)}"
        )


def build_reward_fn(weights: dict[str, float], *, domain: str, device="cpu", ckpt_dir=None):
    """A :class:`rtdmd.rewards.MultiScorer` whose rewards all live in ``domain``."""
    from rtdmd.rewards import MultiScorer

    build_reward_check(weights, domain)
    return MultiScorer(weights, ckpt_dir=ckpt_dir, device=device)


# ----------------------------------------------------------------------------------------------
# LoRA helpers
# ----------------------------------------------------------------------------------------------
class adapters_disabled:
    """Context manager: run a PEFT-injected network with its LoRA adapters switched off."""

    def __init__(self, net: nn.Module):
        self.layers = [m for m in net.modules() if hasattr(m, "enable_adapters") and hasattr(m, "lora_A")]

    def __enter__(self):
        for m in self.layers:
            m.enable_adapters(False)
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m.enable_adapters(True)
        return False


def _unwrap(net: nn.Module) -> nn.Module:
    return getattr(net, "module", net)


@dataclass
class RLNets:
    """Networks and optimizers of one RL run.

    ``generator`` / ``fake_score`` are what forwards go through (possibly DDP/FSDP-wrapped);
    ``gen_params`` / ``fake_params`` the trainable (LoRA) parameters by name.
    """

    teacher: nn.Module
    generator: nn.Module
    fake_score: nn.Module
    gen_params: dict[str, nn.Parameter]
    fake_params: dict[str, nn.Parameter]
    gen_opt: torch.optim.Optimizer
    fake_opt: torch.optim.Optimizer
    gen_sched: Any = None
    fake_sched: Any = None
    ema: Any = None  # rtdmd.algorithms.ema.PolicyEMA over gen_params


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------
class RLEngine:
    """Runs RTDMD epochs; owns the sampler position, the stat tracker and the epoch counter."""

    def __init__(
        self,
        params,
        backbone: Backbone,
        nets: RLNets,
        *,
        prompts: Sequence[Any],
        comm: Comm | None = None,
        reward_fn=None,
        bp_reward_fn=None,
        grad_sync: str | None = "all_reduce",
        reward_ckpt_dir=None,
        autocast: Callable[[], Any] | None = None,
        check_finite: Callable[[dict[str, torch.Tensor]], None] | None = None,
    ):
        from rtdmd.data.samplers import KRepeatSampler

        self.params = params
        self.rl = rl = params.rl
        self.backbone = backbone
        self.nets = nets
        self.comm = comm or LocalComm()
        self.rank, self.world = self.comm.rank, self.comm.world_size
        self.grad_sync = grad_sync
        self.autocast = autocast or contextlib.nullcontext
        self.check_finite = check_finite
        params.check_world_size(self.world, "rl")
        self.bs = params.per_rank(rl.global_sample_batch_size, self.world, "rl.global_sample_batch_size")
        self.nb = rl.num_batches_per_epoch

        # prompts: strings or {"prompt"/"text", "metadata"} items (§12.11 intended behaviour)
        self.prompts, self.metadata = [], []
        for item in prompts:
            if isinstance(item, str):
                self.prompts.append(item)
                self.metadata.append(None)
            elif isinstance(item, dict):
                text = item.get("prompt", item.get("text"))
                if not isinstance(text, str):
                    raise RLConfigError(f"prompt item {item!r} has no 'prompt'/'text' string")
                md = item.get("metadata")
                self.prompts.append(text)
                self.metadata.append(md if isinstance(md, dict) else None)
            else:
                raise RLConfigError(f"prompt items must be strings or dicts, got {type(item).__name__}")
        if not self.prompts:
            raise RLConfigError("the RL prompt set is empty")
        self.sampler = KRepeatSampler(len(self.prompts), self.bs, rl.num_images_per_prompt, self.world,
                                      self.rank, seed=rl.seed, num_batches_per_epoch=self.nb)

        # schedule and steps
        self.sigmas = [float(s) for s in backbone.sigmas(params.sampler.step_list)]
        self.k = len(self.sigmas) - 1
        self.eta = float(params.sampler.eta)
        self.simplified = params.sampler.log_prob == "simplified"
        ss = rl.step_selection
        if ss.enabled and ss.range_end >= self.k:
            raise RLConfigError(f"rl.step_selection.range_end={ss.range_end} is outside the {self.k}-step schedule "
                                f"(steps 0..{self.k - 1})")
        if rl.last_step.loss == "dmd":
            raise RLConfigError("rl.last_step.loss 'dmd' (plain DMD on the last step) is not implemented; "
                                "use 'ac_dmd' (the released objective) or 'none'")

        # rewards
        domain = backbone.domain
        self.bp_weights, ignored = resolve_bp_weights(params)
        self.reward_fn = reward_fn or build_reward_fn(dict(rl.reward_weights), domain=domain,
                                                      device=str(backbone.device), ckpt_dir=reward_ckpt_dir)
        self.bp_active = bool(rl.bp.enabled and rl.bp.grad_scale > 0 and self.bp_weights)
        self.warnings: list[str] = []
        if rl.bp.enabled and rl.bp.grad_scale > 0 and not self.bp_weights:
            self.warnings.append(f"rl.bp is enabled but none of the training rewards {list(rl.reward_weights)} is "
                                 "differentiable: reward back-propagation is off")
        if self.bp_active and ignored:
            self.warnings.append(f"rewards {ignored} are not differentiable: they feed the advantages only, not BP")
        for msg in self.warnings:
            warnings.warn(msg, stacklevel=2)
        self.bp_reward_fn = None
        if self.bp_active:
            self.bp_reward_fn = bp_reward_fn or build_reward_fn(self.bp_weights, domain=domain,
                                                                device=str(backbone.device), ckpt_dir=reward_ckpt_dir)
        self.dm_active = rl.last_step.loss == "ac_dmd"
        self.aux_steps = (resolve_aux_steps(rl.last_step.train_steps, self.k)
                          if (self.dm_active or self.bp_active) else [])
        self.consistency = bool(rl.last_step.consistency and params.consistency.enabled
                                and params.consistency.weight > 0)
        if not rl.policy_gradient and not self.aux_steps:
            raise RLConfigError("nothing to train: rl.policy_gradient is false and neither the last-step "
                                "loss nor BP is active")

        self.tracker = grpo.PerPromptStatTracker(global_std=rl.global_std)
        if rl.clip_range_low <= 0 or rl.clip_range_high <= 0:
            raise RLConfigError(f"rl.clip_range_low/high must be > 0, got {rl.clip_range_low}, {rl.clip_range_high}")
        self.eps_lt, self.eps_gt = float(rl.clip_range_low), float(rl.clip_range_high)
        self.epoch = 0
        self.global_step = 0  # generator optimizer steps
        self.uncond: Cond | None = None

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
        return Rollout.cat(parts)

    @torch.no_grad()
    def score(self, ro: Rollout) -> dict[str, torch.Tensor]:
        images = self.decode(ro.latents[:, -1])
        md = ro.metadata if any(m is not None for m in ro.metadata) else None
        out = self.reward_fn(images, ro.prompts, md)
        return {k: v.float().cpu() for k, v in out.items()}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.backbone.decode(latents.to(self.backbone.dtype))

    # --------------------------------------------------------------------------------- fake score
    def _renoise(self, s: float, batch: int, g: torch.Generator) -> torch.Tensor:
        ac, dmd = self.params.ac_dmd, self.params.dmd
        return renoise_timesteps(s, batch, offset=ac.offset, end_timestep=ac.end_timestep,
                                 lo=max(ac.min_renoise_step, float(dmd.min_step)),
                                 hi=min(ac.max_renoise_step, float(dmd.max_step)), generator=g,
                                 device=self.backbone.device)

    def _velocity(self, net, x, sigma_vec, cond):
        with self.autocast():
            return self.backbone.velocity(net, x.to(self.backbone.dtype), sigma_vec, cond).float()

    def fake_update(self, ro: Rollout, epoch: int) -> dict[str, float]:
        """§7.4: one AC (+ consistency) step of the fake score on all samples of the epoch."""
        nets, params = self.nets, self.params
        fake = nets.fake_score
        fake.train()
        g = torch.Generator().manual_seed(derive_seed("fake", self.rl.seed, epoch, self.rank))
        n = ro.batch_size
        chunk = self.rl.fake_score_batch_size or n
        nets.fake_opt.zero_grad(set_to_none=True)
        tot, cons_tot = 0.0, 0.0
        dev = self.backbone.device
        for j in self.aux_steps:
            s = self.sigmas[j + 1]
            for start in range(0, n, chunk):
                rows = torch.arange(start, min(start + chunk, n))
                bc = rows.numel()
                x_s = ro.latents[rows, j + 1].to(dev)
                cond = ro.cond.index(rows.to(next(iter(ro.cond.tensors.values())).device))
                tau = self._renoise(s, bc, g)
                t = tau / N_TRAIN
                z = torch.randn(x_s.shape, generator=g).to(dev)
                x_t = subinterval_forward(x_s, z, s, t)
                target, scale = subinterval_target(x_s, z, s, t, params.ac_dmd.move_scale_out)
                v = self._velocity(fake, x_t, t, cond)
                lo, hi = params.ac_dmd.weight_clamp
                loss = ac_fake_loss(v, target, scale, lo, hi)
                terms = {"fake/ac": loss}
                if self.consistency:
                    c = params.consistency

                    def fv(x, tau_vec, _cond=cond):
                        return self._velocity(fake, x, tau_vec / N_TRAIN, _cond)

                    lc, _ = consistency_loss(fv, v, x_t, tau, eta=self.eta, eps_timestep=c.eps_timestep,
                                             num_moves=c.num_moves, two_sample=c.two_sample,
                                             stopgrad_transitions=c.stopgrad_transitions, generator=g)
                    terms["fake/consistency"] = lc
                    loss = loss + c.weight * lc
                if self.check_finite is not None:
                    self.check_finite(terms)
                tot += float(terms["fake/ac"].detach()) * bc / n
                if "fake/consistency" in terms:
                    cons_tot += float(terms["fake/consistency"].detach()) * bc / n
                (loss * (bc / n)).backward()
        fp = list(nets.fake_params.values())
        if self.grad_sync == "all_reduce":
            self.comm.all_reduce_mean_([p.grad for p in fp if p.grad is not None])
        gnorm = float(full_tensor(torch.nn.utils.clip_grad_norm_(fp, self.rl.fake_score.max_grad_norm)))
        nets.fake_opt.step()
        if nets.fake_sched is not None:
            nets.fake_sched.step()
        nets.fake_opt.zero_grad(set_to_none=True)
        return {"fake/loss_ac": tot, "fake/loss_cons": cons_tot, "fake/grad_norm": gnorm}

    # --------------------------------------------------------------------------------- advantages
    def advantages(self, ro: Rollout, rewards: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Global advantages (§6.4) sliced to this rank's rows, plus statistics."""
        rl = self.rl
        idx_all = self.comm.all_gather_cat(ro.indices.to(torch.long))
        prompts_all = [self.prompts[i] for i in idx_all.tolist()]
        names = list(rl.reward_weights)
        gathered = {k: self.comm.all_gather_cat(rewards[k].float()) for k in names}
        clip = rl.adv_clip_max if rl.adv_clip_max > 0 else None
        if rl.weight_advantages:
            adv_all = grpo.group_advantages(prompts_all, gathered, weights=dict(rl.reward_weights),
                                            global_std=rl.global_std, clip=clip)
        else:
            total = sum(float(w) * gathered[k] for k, w in rl.reward_weights.items())
            adv_all = grpo.group_advantages(prompts_all, total, global_std=rl.global_std, clip=clip)
        # the stat tracker keeps this epoch's history of the weighted reward (cleared every epoch, §6.4)
        self.tracker.clear()
        mean_all = sum(float(w) * gathered[k] for k, w in rl.reward_weights.items())
        self.tracker.update(prompts_all, mean_all)
        n = ro.batch_size
        adv = adv_all[self.rank * n:(self.rank + 1) * n]
        stats = {
            "adv/mean": float(adv_all.mean()), "adv/std": float(adv_all.std(unbiased=False)),
            "adv/abs_mean": float(adv_all.abs().mean()), "adv/min": float(adv_all.min()),
            "adv/max": float(adv_all.max()), "adv/zero_frac": float((adv_all == 0).float().mean()),
        }
        if clip is not None:
            stats["adv/clip_frac"] = float((adv_all.abs() >= clip).float().mean())
        for k in names:
            stats[f"reward/{k}"] = float(gathered[k].mean())
        stats["reward/mean"] = float(mean_all.mean())
        ts = self.tracker.stats()
        stats["reward/group_size"] = ts["avg_group_size"]
        stats["reward/num_prompts"] = ts["num_prompts"]
        return adv, stats

    # ------------------------------------------------------------------------------ generator step
    def _step_terms(self, ro: Rollout, adv: torch.Tensor, j: int, is_ppo: bool, is_aux: bool,
                    g: torch.Generator, w_cfg: float) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Loss terms of one generator forward at step j (un-divided by G_eff)."""
        gen, dev = self.nets.generator, self.backbone.device
        rl = self.rl
        b = ro.batch_size
        x_j = ro.latents[:, j].to(dev)
        s, s_next = self.sigmas[j], self.sigmas[j + 1]
        sig = torch.full((b,), s, device=dev, dtype=torch.float32)
        v = self._velocity(gen, x_j, sig, ro.cond)
        terms: dict[str, torch.Tensor] = {}
        m: dict[str, float] = {}
        if is_ppo:
            logp = cps_log_prob(ro.latents[:, j + 1].to(dev), x_j, v, s, s_next, self.eta, simplified=self.simplified)
            loss, pm = grpo.ppo_loss(logp, ro.log_probs[:, j].to(dev), adv.to(dev), self.eps_lt, self.eps_gt)
            terms["ppo"] = loss
            m.update({f"ppo/{k}": v_ for k, v_ in pm.items()})
            if rl.kl_beta > 0:
                with torch.no_grad(), adapters_disabled(_unwrap(gen)):
                    v_ref = self._velocity(gen, x_j, sig, ro.cond)
                mu, rho = cps_mean_std(x_j, v, s, s_next, self.eta)
                mu_ref, _ = cps_mean_std(x_j, v_ref, s, s_next, self.eta)
                kl = grpo.kl_to_reference(mu, mu_ref, rho)
                terms["kl"] = rl.kl_beta * kl
                m["ppo/kl"] = float(kl.detach())
        if is_aux:
            if s_next == 0.0:
                x_s = x_j - s * v  # = CPS(x_j, v, σ_j → 0): x̂0 with grad
            else:  # a non-terminal aux step: the CPS output with fresh noise (start_mode next_sigma)
                x_s = cps_step(x_j, v, s, s_next, self.eta,
                               noise=torch.randn(x_j.shape, generator=g).to(dev))
            if self.dm_active:
                tau = self._renoise(s_next, b, g)
                t = tau / N_TRAIN
                z = torch.randn(x_s.shape, generator=g).to(dev)
                with torch.no_grad():
                    x_t = subinterval_forward(x_s.detach(), z, s_next, t)
                    if self.uncond is None or self.uncond.batch_size != b:
                        self.uncond = self.backbone.empty_cond(b)
                    with self.autocast():
                        v_r = self.backbone.teacher_velocity(self.nets.teacher, x_t.to(self.backbone.dtype), t,
                                                             ro.cond, self.uncond, w_cfg).float()
                    v_f = self._velocity(_unwrap(self.nets.fake_score), x_t, t, ro.cond)
                noise = None
                if s_next > 0 and self.eta > 0:
                    noise = torch.randn(x_s.shape, generator=g).to(dev)
                dm, dmm = ac_generator_loss(x_s, x_t, v_r, v_f, t, s_next, self.eta, noise,
                                            normalize=self.params.dmd.gradient_normalization)
                terms["dm"] = rl.last_step.weight * dm.float()
                m["dm/loss"] = dmm["dmd/loss"]
                m["dm/grad_norm"] = dmm["dmd/grad_norm"]
            if self.bp_active and bp_applies(s_next, rl.bp.deterministic_only):
                # Chunked BP with bounded memory: each chunk's decode + reward graph is back-propagated
                # to a detached copy of x̂0 and freed before the next chunk; the gradient reaches the
                # generator through a surrogate whose value is the hinge loss and whose gradient
                # w.r.t. x̂0 is the accumulated one (same gradient as one big backward).
                chunk = rl.bp.batch_size or b
                x_leaf = x_s.detach().requires_grad_(True)
                rs = []
                with torch.enable_grad():
                    for start in range(0, b, chunk):
                        sl = slice(start, min(start + chunk, b))
                        images = self.decode(x_leaf[sl])
                        md = ro.metadata[sl] if any(mm is not None for mm in ro.metadata[sl]) else None
                        r = self.bp_reward_fn.score_differentiable(images, ro.prompts[sl], md)["mean"].to(dev).float()
                        part = bp_hinge_loss(r, rl.bp.margin, rl.bp.grad_scale) * (r.numel() / b)
                        if part.requires_grad:
                            part.backward()
                        rs.append(r.detach())
                r_w = torch.cat(rs)
                bp_value = bp_hinge_loss(r_w, rl.bp.margin, rl.bp.grad_scale)
                grad_x = x_leaf.grad if x_leaf.grad is not None else torch.zeros_like(x_leaf)
                surrogate = (x_s * grad_x.to(x_s.dtype)).sum()
                terms["bp"] = surrogate - surrogate.detach() + bp_value
                m["bp/reward"] = float(r_w.detach().mean())
                m["bp/hinge_active"] = float((r_w.detach() < rl.bp.margin).float().mean())
        return terms, m

    def generator_update(self, ro: Rollout, adv: torch.Tensor, epoch: int, log: bool) -> dict[str, float]:
        nets, rl = self.nets, self.rl
        ppo_steps, all_steps = self.train_steps(epoch)
        aux = set(self.aux_steps)
        g_eff = grad_accum_divisor(self.nb, len(all_steps))
        params = list(nets.gen_params.values())
        g = torch.Generator().manual_seed(derive_seed("gen", rl.seed, epoch, self.rank))
        wg = torch.Generator().manual_seed(derive_seed("cfg", rl.seed, epoch))  # identical on all ranks
        lo, hi = rl.teacher_guidance
        w_cfg = float(lo + (hi - lo) * torch.rand((), generator=wg)) if hi > lo else float(lo)

        # zero-advantage filter (§6.4), then NB sub-batches of a seeded permutation (§6.6)
        fg = torch.Generator().manual_seed(derive_seed("filter", rl.seed, epoch, self.rank))
        if ppo_steps:
            keep = grpo.filter_zero_advantages(adv, self.nb, fg)
        else:
            keep = torch.arange(ro.batch_size)
        perm = keep[torch.randperm(keep.numel(), generator=fg)]
        sub = perm.numel() // self.nb
        nets.generator.train()
        nets.gen_opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        term_sq: dict[str, float] = {}
        # FSDP reduces gradients inside backward: skip the reduction on all but the last backward
        fsdp_sync = getattr(_unwrap(nets.generator), "set_requires_gradient_sync", None) \
            if self.grad_sync is None else None
        split_ok = self.grad_sync is not None  # per-term autograd.grad is not used under FSDP
        n_back, total_back = 0, self.nb * len(all_steps)
        for bi in range(self.nb):
            rows = perm[bi * sub:(bi + 1) * sub]
            sro = ro.index(rows)
            sadv = adv[rows]
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
                if log and bi == 0 and split_ok:
                    # per-term gradient norms: back-propagate the terms one by one (same total)
                    names = list(terms)
                    for ti, name in enumerate(names):
                        grads = torch.autograd.grad(terms[name] / g_eff, params, retain_graph=ti + 1 < len(names),
                                                    allow_unused=True)
                        sq = 0.0
                        for p, gr in zip(params, grads):
                            if gr is None:
                                continue
                            sq += float(gr.detach().float().pow(2).sum())
                            p.grad = gr.detach().clone() if p.grad is None else p.grad + gr.detach()
                        term_sq[name] = term_sq.get(name, 0.0) + sq
                else:
                    (sum(terms.values()) / g_eff).backward()
        if self.grad_sync == "all_reduce":
            self.comm.all_reduce_mean_([p.grad for p in params if p.grad is not None])
        gnorm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, rl.generator.max_grad_norm)))
        nets.gen_opt.step()
        if nets.gen_sched is not None:
            nets.gen_sched.step()
        nets.gen_opt.zero_grad(set_to_none=True)
        n = self.global_step
        self.global_step += 1
        if nets.ema is not None:
            # §12.4 decision: one EMA call per optimizer step (n = index of the step just taken)
            nets.ema.step(nets.gen_params, n)
        out = {k: sums[k] / counts[k] for k in sums}
        out.update({"gen/grad_norm": gnorm, "gen/kept_frac": float(keep.numel()) / ro.batch_size,
                    "gen/lr": float(nets.gen_opt.param_groups[0]["lr"])})
        for name, sq in term_sq.items():
            out[f"grad_norm/{name}"] = math.sqrt(sq)
        for j in range(self.k):
            out[f"steps/selected_{j}"] = float(j in ppo_steps)
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
