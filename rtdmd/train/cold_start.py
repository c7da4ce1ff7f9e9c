r"""Stage 1 — AC-DMD cold start (spec §3.1, §4, §5, §5.8, §8.3).

Per iteration ``k`` (0-based), prompts ``c`` of the per-rank batch ``B``:

* **critic turn** (every iteration): no-grad rollout → sub-interval start ``(x_s, s)`` (§5.1)
  → ``τ ~ U[N·s + offset, end]`` clamped to ``[max(20, min_renoise, dmd.min_step),
  min(980, max_renoise, dmd.max_step, N−1)]`` (§5.2, broadcast from rank 0), ``t = τ/N`` →
  ``x_t = a·x_s + σ_ts·z`` (§5.3) → target ``T' = σ_ts·T`` (§5.4, move_scale_out) →
  ``L_AC = mean[w·(scale·v_φ(x_t, τ) − T')²]``, ``w = clamp(1/scale², 0, 10)`` (§5.5)
  ``+ γ·L_cons`` (§5.7; two-sample product estimator, δ broadcast from rank 0) → AdamW step.
* **generator turn** when ``(k + 1) % fake_update_ratio == 0`` (TTUR, §4.3): rollout where only
  the last executed step is differentiable (§3.1.4) → ``x_s = x_S`` (CPS output, grad through
  ``v_{S−1}``) → fresh ``τ, z`` → ``x_t`` → teacher ``v_r`` with CFG ``w ~ U[w_min, w_max]``
  (broadcast) and fake ``v_f`` (no CFG), both no-grad → shared-noise back-projections
  ``x_r, x_f = CPS(x_t, v_{r,f}, t → s, η, ξ')`` → ``L_DM(x_s, x_f, x_r)`` (§4.1, §5.6).
* generator EMA every iteration (``ema_every``), §8.3.

Rollout (§3.1): ``x_0 ~ N(0, I)``; random stop ``S ~ U{1..K}`` drawn on rank 0 and broadcast
(all ranks run the same number of forwards — needed by FSDP); ``x_{i+1} = CPS(x_i, v_i, σ_i →
σ_{i+1}, η)``. Two independent rollouts per generator iteration (one per turn).

``ac_dmd.enabled: false`` = plain DMD (§4.2): generator ``x̂0 = x_{S−1} − σ_{S−1}·v`` (grad),
index ``k`` from ``dmd.timestep_sampling`` in ``[min_step, max_step]``, ``σ = σ_tab[k]`` (§1.5),
``x_t = (1−σ)x̂0 + σz``, ``x_{r,f} = x_t − σ·v_{r,f}``; fake: logit-normal index over [0, 999]
on the descending table, ``L = mean (v_φ(x_t) − (z − x̂0))²``. The consistency regulariser is
governed by ``consistency.enabled`` in both modes (departure: applied at ``τ = Nσ`` in plain mode).

Deliberate choices for the reference quirks of §12:

* §12.1 LoRA master weights, optimizer states: **fp32** (the reference keeps them in bf16, where
  most AdamW updates of ``A`` round away); forward in ``distributed.mixed_precision``.
* §12.3 EMA: **fp32 shadow** by default; ``cold_start.ema_dtype: bfloat16`` reproduces the
  reference's sticky bf16 EMA. The EMA covers the generator's LoRA tensors (the only weights
  that change), not a full model copy.
* §12.8 clamping τ to ``[20, 980]`` (point mass at 980 for high start sigmas) is **kept** as in
  the reference (it is what the released models were trained with).
* §12.2 (re-init after merge) only matters with ``--init``: ``lora.reinit_after_merge``.
* §12.6 FLUX bf16 timestep quantisation: off (backbone flag ``quantize_timestep``).
* Randomness: rank-local draws (noise, rollout latents) come from the process RNG seeded
  ``seed + rank``; shared scalars are drawn on every rank (so RNG streams stay aligned) and rank
  0's value is broadcast.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rtdmd.algorithms.ac_dmd import (ac_fake_loss, ac_generator_loss, renoise_timesteps, subinterval_forward,
                                     subinterval_start, subinterval_target)
from rtdmd.algorithms.consistency import consistency_loss, draw_consistency_deltas
from rtdmd.algorithms.cps import cps_step
from rtdmd.algorithms.dmd import dmd_loss, plain_fake_score_loss, sample_timestep_index
from rtdmd.algorithms.schedules import dmd_sigma_table
from rtdmd.backbones.base import Cond
from rtdmd.train import dist as D
from rtdmd.train.base import Trainer

N_TRAIN = 1000


@dataclass
class LastStep:
    """Data of the last executed rollout step (§3.1.5)."""

    x_in: torch.Tensor
    v: torch.Tensor
    sigma_c: float
    sigma_n: float
    x_next: torch.Tensor
    stop: int


class ColdStartTrainer(Trainer):
    stage = "cold_start"

    def stage_config(self):
        return self.params.cold_start

    def milestones(self) -> tuple[int, ...]:
        return tuple(self.params.cold_start.milestones)

    def setup(self) -> None:
        super().setup()
        self.sigmas = [float(s) for s in self.backbone.sigmas(list(self.params.sampler.step_list))]
        self.eta = float(self.params.sampler.eta)
        fam = {"toy2d": "linear"}.get(self.backbone.family, self.backbone.family)
        self.sigma_table = dmd_sigma_table(fam).to(self.env.device)
        self._eval_ref = None

    # ---- shared draws (broadcast from rank 0) --------------------------------------------------
    def draw_stop(self) -> int:
        k = len(self.sigmas) - 1
        if not self.cfg.random_stop:
            return k
        return int(D.broadcast_tensor(torch.randint(1, k + 1, (1,)))[0])

    def draw_teacher_scale(self) -> float:
        lo, hi = self.cfg.teacher_guidance
        if lo == hi:
            return float(lo)
        return float(D.broadcast_tensor(lo + (hi - lo) * torch.rand(1, dtype=torch.float64))[0])

    def draw_tau(self, s: torch.Tensor) -> torch.Tensor:
        ac, dm = self.params.ac_dmd, self.params.dmd
        lo = max(0.0, ac.min_renoise_step, float(dm.min_step))
        hi = min(ac.max_renoise_step, float(dm.max_step), N_TRAIN - 1.0)
        tau = renoise_timesteps(s, s.shape[0], offset=ac.offset, end_timestep=ac.end_timestep, lo=lo, hi=hi)
        return D.broadcast_tensor(tau)

    # ---- model calls ------------------------------------------------------------------------------
    def velocity(self, role: str, x: torch.Tensor, sigma, cond: Cond) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        with self.roles.autocast():
            return self.backbone.velocity(self.roles.nets[role], x, s, cond).float()

    def teacher_velocity(self, x, sigma, cond: Cond, uncond: Cond, scale: float) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        with self.roles.autocast():
            return self.backbone.teacher_velocity(self.roles.teacher, x, s, cond, uncond, scale).float()

    def rollout(self, cond: Cond, grad: bool) -> LastStep:
        """Backward simulation with random stop; only the last executed step keeps its graph."""
        batch = cond.batch_size
        stop = self.draw_stop()
        x = torch.randn(self.backbone.latent_shape(batch), device=self.env.device, dtype=torch.float32)
        for i in range(stop):
            last = i == stop - 1
            sc, sn = self.sigmas[i], self.sigmas[i + 1]
            with torch.set_grad_enabled(grad and last):
                v = self.velocity("generator", x, sc, cond)
                x_next = cps_step(x, v, sc, sn, self.eta)
            if not last:
                x = x_next
        return LastStep(x_in=x, v=v, sigma_c=sc, sigma_n=sn, x_next=x_next, stop=stop)

    def start_point(self, last: LastStep) -> tuple[torch.Tensor, torch.Tensor]:
        ac = self.params.ac_dmd
        idx = min(max(ac.boundary_index, 0), len(self.sigmas) - 1)
        return subinterval_start(ac.start_mode, sigma_current=last.sigma_c, sigma_next=last.sigma_n,
                                 x_next=last.x_next, x_in=last.x_in, velocity=last.v, eta=self.eta,
                                 boundary_sigma=self.sigmas[idx])

    def conditioning(self) -> tuple[Cond, Cond]:
        prompts = self.data.next()
        cond = self.backbone.encode_prompts(prompts).to(self.env.device)
        return cond, self.backbone.empty_cond(len(prompts))

    # ---- turns ------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cond, uncond = self.conditioning()
        metrics = self.critic_turn(cond, uncond)
        if (self.step + 1) % self.cfg.fake_update_ratio == 0:
            metrics.update(self.generator_turn(cond, uncond))
        return metrics

    def _consistency(self, v_phi, x_t, tau, cond, terms, weights, metrics) -> None:
        cc = self.params.consistency
        if not cc.enabled:
            return
        deltas = D.broadcast_tensor(draw_consistency_deltas(x_t.shape[0], cc.num_moves, cc.eps_timestep))
        loss, m = consistency_loss(
            lambda x, tau_: self.velocity("fake_score", x, tau_ / N_TRAIN, cond), v_phi, x_t, tau,
            eta=self.eta, eps_timestep=cc.eps_timestep, num_moves=cc.num_moves, two_sample=cc.two_sample,
            stopgrad_transitions=cc.stopgrad_transitions, deltas=deltas)
        terms["fake/consistency"] = loss
        weights["fake/consistency"] = cc.weight
        metrics.update(m)

    def critic_turn(self, cond: Cond, uncond: Cond) -> dict[str, float]:
        """One fake-score update (§5.5 + §5.7, or plain FM §4.2)."""
        ac = self.params.ac_dmd
        terms, weights, metrics = {}, {}, {}
        with torch.no_grad():
            last = self.rollout(cond, grad=False)
        if ac.enabled:
            x_s, s = self.start_point(last)
            x_s = x_s.detach()
            tau = self.draw_tau(s)
            t = tau / N_TRAIN
            z = torch.randn_like(x_s)
            x_t = subinterval_forward(x_s, z, s, t)
            target, scale = subinterval_target(x_s, z, s, t, ac.move_scale_out)
            v_phi = self.velocity("fake_score", x_t, t, cond)
            terms["fake/ac"] = ac_fake_loss(v_phi, target, scale, *ac.weight_clamp)
        else:
            x0 = (last.x_in - last.sigma_c * last.v).detach()
            k = sample_timestep_index(x0.shape[0], min_step=0, max_step=N_TRAIN - 1, mode="logit_normal",
                                      logit_mean=self.params.dmd.logit_mean, logit_std=self.params.dmd.logit_std)
            sigma = self.sigma_table.flip(0)[k.to(self.env.device)]
            z = torch.randn_like(x0)
            sb = sigma.reshape([-1] + [1] * (x0.dim() - 1))
            x_t = (1 - sb) * x0 + sb * z
            tau = sigma * N_TRAIN
            v_phi = self.velocity("fake_score", x_t, sigma, cond)
            terms["fake/fm"] = plain_fake_score_loss(v_phi, z, x0)
        self._consistency(v_phi, x_t, tau, cond, terms, weights, metrics)
        metrics.update({k: float(v.detach()) for k, v in terms.items()})
        metrics.update(self.update("fake_score", terms, weights))
        metrics["rollout/stop"] = float(last.stop)
        return metrics

    def generator_turn(self, cond: Cond, uncond: Cond) -> dict[str, float]:
        """One generator update (§5.6 AC-DMD, or plain DMD §4.2)."""
        ac, dm = self.params.ac_dmd, self.params.dmd
        last = self.rollout(cond, grad=True)
        scale = self.draw_teacher_scale()
        if ac.enabled:
            x_s, s = self.start_point(last)
            tau = self.draw_tau(s)
            t = tau / N_TRAIN
            z = torch.randn_like(x_s)
            with torch.no_grad():
                x_t = subinterval_forward(x_s.detach(), z, s, t)
                v_r = self.teacher_velocity(x_t, t, cond, uncond, scale)
                v_f = self.velocity("fake_score", x_t, t, cond)
            loss, m = ac_generator_loss(x_s, x_t, v_r, v_f, t, s, self.eta, normalize=dm.gradient_normalization)
        else:
            x0 = last.x_in - last.sigma_c * last.v
            k = sample_timestep_index(x0.shape[0], min_step=dm.min_step, max_step=dm.max_step,
                                      mode=dm.timestep_sampling, logit_mean=dm.logit_mean, logit_std=dm.logit_std)
            sigma = self.sigma_table[k.to(self.env.device)]
            sb = sigma.reshape([-1] + [1] * (x0.dim() - 1))
            z = torch.randn_like(x0)
            with torch.no_grad():
                x_t = (1 - sb) * x0.detach() + sb * z
                x_r = x_t - sb * self.teacher_velocity(x_t, sigma, cond, uncond, scale)
                x_f = x_t - sb * self.velocity("fake_score", x_t, sigma, cond)
            loss, m = dmd_loss(x0, x_f, x_r, normalize=dm.gradient_normalization)
        metrics = {"generator/dmd": float(loss.detach()), "generator/dmd_g_norm": m["dmd/grad_norm"]}
        metrics.update(self.update("generator", {"generator/dmd": loss}))
        return metrics

    # ---- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """EMA generator, K steps, η = sampler.eta, fixed seed (never touches the training RNG)."""
        from rtdmd.sampling import generate

        sp = self.params.sampler
        net = self.roles.raw["generator"]
        seed = self.params.eval.seed + self.env.rank
        with self.ema.swapped_in(self.roles.lora_params("generator")):
            if self.backbone.family == "toy2d":
                from rtdmd.eval.toy2d_proof import class_distances, teacher_reference

                if self._eval_ref is None:
                    self._eval_ref = teacher_reference(self.backbone, self.roles.teacher, 512, seed=10_000 + seed)
                out = class_distances(self.backbone, net, self._eval_ref, list(sp.step_list), self.eta, seed)
                metrics = {"eval/swd": out["swd"], "eval/mmd": out["mmd"]}
            else:
                prompts = self.data.batch_at(0)[:2]
                img = generate(self.backbone, net, prompts, step_list=list(sp.step_list), eta=self.eta, seed=seed)
                metrics = {"eval/image_mean": float(img.float().mean()), "eval/image_std": float(img.float().std())}
            self.roles.reshard()  # drop FSDP2 unsharded copies of the EMA weights before swapping back
        return D.reduce_mean(metrics)
