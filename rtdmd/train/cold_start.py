r"""Stage 1 — AC-DMD cold start (spec §3.1, §4, §5, §5.8, §8.3).

Per iteration ``k`` (0-based), prompts ``c`` of the per-rank batch ``B``:

* **critic turn** (every iteration): no-grad rollout → sub-interval start ``(x_s, s)`` (§5.1)
  → ``τ ~ U[N·s + offset, end]`` clamped to ``[max(20, min_renoise, dmd.min_step),
  min(980, max_renoise, dmd.max_step, N−1)]`` (§5.2, shared stream), ``t = τ/N`` →
  ``x_t = a·x_s + σ_ts·z`` (§5.3) → target ``T' = σ_ts·T`` (§5.4, move_scale_out) →
  ``L_AC = mean[w·(scale·v_φ(x_t, τ) − T')²]``, ``w = clamp(1/scale², 0, 10)`` (§5.5)
  ``+ γ·L_cons`` (§5.7; two-sample product estimator, δ from the shared stream) → AdamW step.
* **generator turn** when ``(k + 1) % fake_update_ratio == 0`` (TTUR, §4.3): rollout where only
  the last executed step is differentiable (§3.1.4) → ``x_s = x_S`` (CPS output, grad through
  ``v_{S−1}``) → fresh ``τ, z`` → ``x_t`` → teacher ``v_r`` with CFG ``w ~ U[w_min, w_max]``
  (shared stream) and fake ``v_f`` (no CFG), both no-grad → shared-noise back-projections
  ``x_r, x_f = CPS(x_t, v_{r,f}, t → s, η, ξ')`` → ``L_DM(x_s, x_f, x_r)`` (§4.1, §5.6).
* generator EMA every iteration (``ema_every``), §8.3.

Rollout (§3.1): ``x_0 ~ N(0, I)``; random stop ``S ~ U{1..K}`` from the shared stream
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
* Randomness (the stage-2 scheme, :func:`rtdmd.dist.derived_generator`): every iteration ``k``
  draws from two CPU generators derived from ``(cold_start.seed, k)`` — the *shared* stream
  (random stop, teacher CFG scale, τ, consistency δ: identical on every rank without a
  broadcast, as the reference's rank-0 broadcast makes them) — and ``(cold_start.seed, k, rank)``
  — the *local* stream (rollout latents, CPS noise, z, ξ', plain-DMD indices). A resumed run
  re-draws exactly what the interrupted one would have, whatever the RNG state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from rtdmd import dist as D
from rtdmd.algorithms.ac_dmd import ac_generator_loss, subinterval_forward, subinterval_start
from rtdmd.algorithms.consistency import draw_consistency_deltas
from rtdmd.algorithms.cps import cps_step
from rtdmd.algorithms.dmd import dmd_loss, plain_fake_score_loss, sample_timestep_index
from rtdmd.algorithms.ema import ModelEMA
from rtdmd.algorithms.fake_score import N_TRAIN, ac_fake_score_terms, consistency_term, draw_renoise
from rtdmd.algorithms.schedules import dmd_sigma_table
from rtdmd.backbones.base import POINTS, Cond
from rtdmd.metrics.toy2d import class_distances, teacher_reference
from rtdmd.train.base import LoopConfig, Trainer
from rtdmd.train.prompts import PromptStream, read_prompt_list


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

    def loop_config(self) -> LoopConfig:
        c = self.params.cold_start
        return LoopConfig(total_steps=c.total_steps, seed=c.seed, log_interval=c.log_interval,
                          eval_interval=c.eval_interval, checkpoint=c.checkpoint,
                          optim={"generator": c.generator, "fake_score": c.fake_score})

    def build_data(self):
        return PromptStream(read_prompt_list(self.cfg.prompts), self.cfg.global_batch_size,
                            self.env.rank, self.env.world, self.cfg.seed)

    def build_ema(self):
        """Generator EMA every ``ema_every`` iterations (§8.3); bf16 shadow on request (§12.3)."""
        dtype = torch.bfloat16 if self.cfg.ema_dtype == "bfloat16" else torch.float32
        return ModelEMA(self.roles.lora_params("generator"), decay=self.cfg.ema_decay,
                        every=self.cfg.ema_every, shadow_dtype=dtype)

    def milestones(self) -> tuple[int, ...]:
        return tuple(self.params.cold_start.milestones)

    def setup(self) -> None:
        super().setup()
        self.sigmas = [float(s) for s in self.backbone.sigmas(list(self.params.sampler.step_list))]
        self.eta = float(self.params.sampler.eta)
        fam = {"toy2d": "linear"}.get(self.backbone.family, self.backbone.family)
        self.sigma_table = dmd_sigma_table(fam).to(self.env.device)
        self._eval_ref = None
        self._sigma_vectors: dict[tuple, torch.Tensor] = {}
        self.begin_step()  # streams of the (possibly resumed) current step

    # ---- random streams derived from (seed, step[, rank]) ------------------------------------------
    def begin_step(self) -> None:
        """This iteration's streams: ``shared`` (same on every rank) and ``local`` (this rank's)."""
        seed = self.cfg.seed
        self.shared = D.derived_generator("cold_start/shared", seed, self.step)
        self.local = D.derived_generator("cold_start/local", seed, self.step, self.env.rank)

    def randn(self, shape) -> torch.Tensor:
        """Rank-local standard normal noise (drawn on CPU, moved to the device)."""
        return torch.randn(tuple(shape), generator=self.local, dtype=torch.float32).to(self.env.device)

    def draw_stop(self) -> int:
        k = len(self.sigmas) - 1
        if not self.cfg.random_stop:
            return k
        return int(torch.randint(1, k + 1, (1,), generator=self.shared)[0])

    def draw_teacher_scale(self) -> float:
        lo, hi = self.cfg.teacher_guidance
        if lo == hi:
            return float(lo)
        return float((lo + (hi - lo) * torch.rand(1, dtype=torch.float64, generator=self.shared))[0])

    def draw_tau(self, s: torch.Tensor) -> torch.Tensor:
        return draw_renoise(s, s.shape[0], self.params.ac_dmd, self.params.dmd, generator=self.shared)

    # ---- model calls ------------------------------------------------------------------------------
    def sigma_vector(self, sigma, x: torch.Tensor) -> torch.Tensor:
        """``σ`` as the ``[B]`` fp32 vector the backbones take. A python-float σ's vector is
        memoised (the rollout reuses the same K sigmas every iteration; it is an expanded view,
        which nothing writes to), except under a dispatch mode (the planner's fake tensors)."""
        b = x.shape[0]
        if isinstance(sigma, torch.Tensor):
            s = sigma.to(dtype=torch.float32, device=x.device)
            return s if s.shape == (b,) else s.reshape(-1).expand(b)
        if _get_current_dispatch_mode() is not None:
            return torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
        key = (float(sigma), b, x.device)
        s = self._sigma_vectors.get(key)
        if s is None:
            with torch.inference_mode(False):  # a plain tensor even if first built in inference mode
                s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
            if len(self._sigma_vectors) < 256:
                self._sigma_vectors[key] = s
        return s

    def velocity(self, role: str, x: torch.Tensor, sigma, cond: Cond) -> torch.Tensor:
        s = self.sigma_vector(sigma, x)
        with self.roles.autocast():
            return self.backbone.velocity(self.roles.nets[role], x, s, cond).float()

    def teacher_velocity(self, x, sigma, cond: Cond, uncond: Cond, scale: float) -> torch.Tensor:
        s = self.sigma_vector(sigma, x)
        with self.roles.autocast():
            return self.backbone.teacher_velocity(self.roles.teacher, x, s, cond, uncond, scale).float()

    def rollout(self, cond: Cond, grad: bool) -> LastStep:
        """Backward simulation with random stop; only the last executed step keeps its graph."""
        batch = cond.batch_size
        stop = self.draw_stop()
        x = self.randn(self.backbone.latent_shape(batch))
        for i in range(stop):
            last = i == stop - 1
            sc, sn = self.sigmas[i], self.sigmas[i + 1]
            with torch.set_grad_enabled(grad and last):
                v = self.velocity("generator", x, sc, cond)
                x_next = cps_step(x, v, sc, sn, self.eta, generator=self.local)
            if not last:
                x = x_next
        return LastStep(x_in=x, v=v, sigma_c=sc, sigma_n=sn, x_next=x_next, stop=stop)

    def start_point(self, last: LastStep) -> tuple[torch.Tensor, torch.Tensor]:
        ac = self.params.ac_dmd
        idx = min(max(ac.boundary_index, 0), len(self.sigmas) - 1)
        return subinterval_start(ac.start_mode, sigma_current=last.sigma_c, sigma_next=last.sigma_n,
                                 x_next=last.x_next, x_in=last.x_in, velocity=last.v, eta=self.eta,
                                 boundary_sigma=self.sigmas[idx], generator=self.local)

    def conditioning(self) -> tuple[Cond, Cond]:
        prompts = self.data.next()
        cond = self.backbone.encode_prompts(prompts).to(self.env.device)
        return cond, self.backbone.empty_cond(len(prompts))

    # ---- turns ------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        self.begin_step()
        cond, uncond = self.conditioning()
        metrics = self.critic_turn(cond, uncond)
        if (self.step + 1) % self.cfg.fake_update_ratio == 0:
            metrics.update(self.generator_turn(cond, uncond))
        return metrics

    def _deltas(self, batch: int):
        """Consistency move sizes δ from the shared stream (None when the term is off)."""
        cc = self.params.consistency
        if not cc.enabled:
            return None
        return draw_consistency_deltas(batch, cc.num_moves, cc.eps_timestep, generator=self.shared)

    def _plain_fake_terms(self, last: LastStep, fake) -> tuple[dict, dict, dict]:
        """Plain flow matching of the fake score on x̂0 (§4.2) + the consistency term at τ = Nσ."""
        x0 = (last.x_in - last.sigma_c * last.v).detach()
        k = sample_timestep_index(x0.shape[0], min_step=0, max_step=N_TRAIN - 1, mode="logit_normal",
                                  logit_mean=self.params.dmd.logit_mean, logit_std=self.params.dmd.logit_std,
                                  generator=self.local)
        sigma = self.sigma_table.flip(0)[k.to(self.env.device)]
        z = self.randn(x0.shape)
        sb = sigma.reshape([-1] + [1] * (x0.dim() - 1))
        x_t = (1 - sb) * x0 + sb * z
        tau = sigma * N_TRAIN
        v_phi = fake(x_t, sigma)
        terms, weights, metrics = {"fake/fm": plain_fake_score_loss(v_phi, z, x0)}, {}, {}
        cc = self.params.consistency
        if cc.enabled:
            terms["fake/consistency"], metrics = consistency_term(fake, v_phi, x_t, tau, cc, self.eta,
                                                                  deltas=self._deltas(x_t.shape[0]),
                                                                  generator=self.local)
            weights["fake/consistency"] = cc.weight
        return terms, weights, metrics

    def critic_turn(self, cond: Cond, uncond: Cond) -> dict[str, float]:
        """One fake-score update (the shared AC step §5.5 + §5.7, or plain FM §4.2)."""
        ac = self.params.ac_dmd
        with torch.no_grad():
            last = self.rollout(cond, grad=False)

        def fake(x, t):
            return self.velocity("fake_score", x, t, cond)

        if ac.enabled:
            x_s, s = self.start_point(last)
            x_s = x_s.detach()
            tau = self.draw_tau(s)
            z = self.randn(x_s.shape)
            cc = self.params.consistency
            terms, weights, metrics, _ = ac_fake_score_terms(
                fake, x_s, s, tau, z, ac, eta=self.eta, cc=cc if cc.enabled else None,
                deltas=self._deltas(x_s.shape[0]), generator=self.local)
        else:
            terms, weights, metrics = self._plain_fake_terms(last, fake)
        metrics = dict(metrics)
        metrics.update(self.update("fake_score", terms, weights))  # the terms' values, then the norms
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
            z = self.randn(x_s.shape)
            with torch.no_grad():
                x_t = subinterval_forward(x_s.detach(), z, s, t)
                v_r = self.teacher_velocity(x_t, t, cond, uncond, scale)
                v_f = self.velocity("fake_score", x_t, t, cond)
            loss, m = ac_generator_loss(x_s, x_t, v_r, v_f, t, s, self.eta, normalize=dm.gradient_normalization,
                                        generator=self.local)
        else:
            x0 = last.x_in - last.sigma_c * last.v
            k = sample_timestep_index(x0.shape[0], min_step=dm.min_step, max_step=dm.max_step,
                                      mode=dm.timestep_sampling, logit_mean=dm.logit_mean, logit_std=dm.logit_std,
                                      generator=self.local)
            sigma = self.sigma_table[k.to(self.env.device)]
            sb = sigma.reshape([-1] + [1] * (x0.dim() - 1))
            z = self.randn(x0.shape)
            with torch.no_grad():
                x_t = (1 - sb) * x0.detach() + sb * z
                x_r = x_t - sb * self.teacher_velocity(x_t, sigma, cond, uncond, scale)
                x_f = x_t - sb * self.velocity("fake_score", x_t, sigma, cond)
            loss, m = dmd_loss(x0, x_f, x_r, normalize=dm.gradient_normalization)
        out = self.update("generator", {"generator/dmd": loss})
        metrics = {"generator/dmd": out.pop("generator/dmd"), "generator/dmd_g_norm": m["dmd/grad_norm"]}
        metrics.update(out)
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
            if self.backbone.domain == POINTS:
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
