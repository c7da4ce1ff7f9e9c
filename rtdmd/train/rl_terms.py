r"""Loss terms of one stage-2 generator forward at rollout step ``j`` (§6.5, §7.2, §7.3).

:class:`GeneratorTerms` is the part of :class:`rtdmd.train.rl_core.RLEngine` that turns one
sub-batch and one step into loss terms (un-divided by ``G_eff``)::

    v = G(x_j, σ_j)
    [j ∈ ppo]  "ppo" = mean_B max(−A·ratio, −A·clip(ratio, 1−ε_lt, 1+ε_gt)),
               ratio = exp(logp(x_{j+1} | x_j; v) − logp_old);  "kl" = kl_beta·L_KL (adapters-off reference)
    [j ∈ aux]  x_s = x_j − σ_j v (σ_{j+1} = 0) or the CPS output with fresh noise;
               "dm" = w_dm · L_DM(x_s, x_f, x_r) with τ, z from the step's generator (§5.2 clamp
               of :func:`rtdmd.algorithms.fake_score.draw_renoise`), teacher CFG scale ``w_cfg``;
               "bp" = bp_grad_scale · mean_B relu(margin − R_w(decode(x_s))) (chunked, below).
"""
from __future__ import annotations

import torch
from torch import nn

from rtdmd.algorithms import grpo
from rtdmd.algorithms.ac_dmd import ac_generator_loss, subinterval_forward
from rtdmd.algorithms.cps import cps_log_prob, cps_mean_std, cps_step
from rtdmd.algorithms.fake_score import N_TRAIN, draw_renoise
from rtdmd.algorithms.reward_bp import bp_hinge_loss
from rtdmd.algorithms.rtdmd_objective import bp_applies
from rtdmd.train.rl_rollout import Rollout

__all__ = ["GeneratorTerms", "adapters_disabled", "chunk_slices", "unwrap"]


def chunk_slices(n: int, size: int) -> list[slice]:
    """Consecutive row slices of at most ``size`` covering ``range(n)`` (the RL stage's chunked
    loops; :mod:`rtdmd.plan.simulate` replaces it to simulate a long loop by its first chunks)."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


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


def unwrap(net: nn.Module) -> nn.Module:
    return getattr(net, "module", net)


class GeneratorTerms:
    """Mixin of :class:`~rtdmd.train.rl_core.RLEngine`: per-step generator loss terms."""

    def _velocity(self, net, x, sigma_vec, cond):
        with self.autocast():
            return self.backbone.velocity(net, x.to(self.backbone.dtype), sigma_vec, cond).float()

    def _renoise(self, s: float, batch: int, g: torch.Generator) -> torch.Tensor:
        return draw_renoise(s, batch, self.params.ac_dmd, self.params.dmd, generator=g, device=self.backbone.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.backbone.decode(latents.to(self.backbone.dtype))

    def _step_terms(self, ro: Rollout, adv: torch.Tensor, j: int, is_ppo: bool, is_aux: bool,
                    g: torch.Generator, w_cfg: float) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Loss terms of one generator forward at step j (un-divided by G_eff)."""
        dev = self.backbone.device
        x_j = ro.latents[:, j].to(dev)
        s = self.sigmas[j]
        sig = torch.full((ro.batch_size,), s, device=dev, dtype=torch.float32)
        v = self._velocity(self.nets.generator, x_j, sig, ro.cond)
        terms: dict[str, torch.Tensor] = {}
        m: dict[str, float] = {}
        if is_ppo:
            self._ppo_terms(ro, adv, j, x_j, sig, v, terms, m)
        if is_aux:
            x_s = self._aux_start(x_j, v, j, g)
            if self.dm_active:
                self._dm_term(ro, x_s, j, g, w_cfg, terms, m)
            if self.bp_active and bp_applies(self.sigmas[j + 1], self.rl.bp.deterministic_only):
                self._bp_term(ro, x_s, terms, m)
        return terms, m

    def _ppo_terms(self, ro, adv, j, x_j, sig, v, terms, m) -> None:
        """Clipped PPO surrogate (§6.5) and, with ``rl.kl_beta > 0``, the KL to the reference policy."""
        dev, rl = self.backbone.device, self.rl
        s, s_next = self.sigmas[j], self.sigmas[j + 1]
        logp = cps_log_prob(ro.latents[:, j + 1].to(dev), x_j, v, s, s_next, self.eta, simplified=self.simplified)
        loss, pm = grpo.ppo_loss(logp, ro.log_probs[:, j].to(dev), adv.to(dev), self.eps_lt, self.eps_gt)
        terms["ppo"] = loss
        m.update({f"ppo/{k}": v_ for k, v_ in pm.items()})
        if rl.kl_beta > 0:
            gen = self.nets.generator
            with torch.no_grad(), adapters_disabled(unwrap(gen)):
                v_ref = self._velocity(gen, x_j, sig, ro.cond)
            mu, rho = cps_mean_std(x_j, v, s, s_next, self.eta)
            mu_ref, _ = cps_mean_std(x_j, v_ref, s, s_next, self.eta)
            kl = grpo.kl_to_reference(mu, mu_ref, rho)
            terms["kl"] = rl.kl_beta * kl
            m["ppo/kl"] = float(kl.detach())

    def _aux_start(self, x_j, v, j: int, g: torch.Generator) -> torch.Tensor:
        """``x_s`` with grad: x̂0 = x_j − σ_j v on the last step, else the CPS output with fresh noise."""
        s, s_next = self.sigmas[j], self.sigmas[j + 1]
        if s_next == 0.0:
            return x_j - s * v  # = CPS(x_j, v, σ_j → 0)
        return cps_step(x_j, v, s, s_next, self.eta, noise=torch.randn(x_j.shape, generator=g).to(x_j.device))

    def _dm_term(self, ro, x_s, j: int, g: torch.Generator, w_cfg: float, terms, m) -> None:
        """``w_dm · L_DM`` of the final-step AC-DMD (§7.2, §5.6)."""
        dev, b, s_next = self.backbone.device, ro.batch_size, self.sigmas[j + 1]
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
            v_f = self._velocity(unwrap(self.nets.fake_score), x_t, t, ro.cond)
        noise = None
        if s_next > 0 and self.eta > 0:
            noise = torch.randn(x_s.shape, generator=g).to(dev)
        dm, dmm = ac_generator_loss(x_s, x_t, v_r, v_f, t, s_next, self.eta, noise,
                                    normalize=self.params.dmd.gradient_normalization)
        terms["dm"] = self.rl.last_step.weight * dm.float()
        m["dm/loss"] = dmm["dmd/loss"]
        m["dm/grad_norm"] = dmm["dmd/grad_norm"]

    def _bp_term(self, ro, x_s, terms, m) -> None:
        """Reward back-propagation hinge (§7.3), chunked with bounded memory.

        Each chunk's decode + reward graph is back-propagated to a detached copy of x̂0 and freed
        before the next chunk; the gradient reaches the generator through a surrogate whose value
        is the hinge loss and whose gradient w.r.t. x̂0 is the accumulated one (same gradient as
        one big backward).
        """
        rl, dev, b = self.rl, self.backbone.device, ro.batch_size
        chunk = rl.bp.batch_size or b
        x_leaf = x_s.detach().requires_grad_(True)
        rs = []
        with torch.enable_grad():
            for sl in chunk_slices(b, chunk):
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
        r_d = r_w.detach()
        m["bp/reward"], m["bp/hinge_active"] = torch.stack([r_d.mean(), (r_d < rl.bp.margin).float().mean()]).tolist()
