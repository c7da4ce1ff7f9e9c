"""One optimizer step of one trainable role — the sequence both stages use.

``RoleOptimizer`` owns AdamW over a role's LoRA parameters and its ``LambdaLR`` warm-up
schedule: ``min(1, k/warmup)`` as the reference (its first step runs at lr 0), or
``min(1, (k+1)/warmup)`` with ``warmup_formula: shifted``; both are constant for warmup 0 (every
shipped params file). An optimizer step is::

    zero()                                   # at the start
    accumulate(terms, weights, divisor)      # any number of times: backward of Σ w·term / divisor
    step()                                   # [sync grads] → clip ‖∇‖ ≤ max_grad_norm → AdamW → LR step

``accumulate(..., term_norms=...)`` also returns each term's squared gradient norm (log steps):
``"accumulate"`` back-propagates the terms one at a time and adds their gradients (their sum is
the usual gradient, up to float rounding; the RL engine, whose modules are unwrapped);
``"measure"`` measures each term's gradient and then runs the one combined backward (stage 1,
whose DDP wrapper all-reduces gradients inside ``backward`` only). ``sync`` (the RL engine's
explicit gradient all-reduce, passed to ``step``) runs before clipping; ``None`` when DDP/FSDP
reduce inside backward. Clipping uses the global (sharding-aware) norm. AdamW runs its
multi-tensor (``foreach``) implementation on every device (torch picks it only for CUDA by
default; on CPU it replaces a Python loop over parameters, with bit-identical results).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from rtdmd.dist import full_tensor


class RoleOptimizer:
    """AdamW + LR schedule + clip of one role; see the module docstring for the step sequence."""

    def __init__(self, params: dict[str, nn.Parameter], oc):
        self.oc = oc
        self.optimizer = torch.optim.AdamW(list(params.values()), lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps,
                                           weight_decay=oc.weight_decay, foreach=True)
        warm, shift = oc.warmup_steps, 1 if oc.warmup_formula == "shifted" else 0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda k, w=warm, d=shift: 1.0 if w <= 0 else min(1.0, (k + d) / w))

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters the optimizer owns (under FSDP2: the sharded ones)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def zero(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def accumulate(self, terms: dict[str, torch.Tensor], weights: dict[str, float] | None = None,
                   divisor: float | None = None, scale: float | None = None,
                   term_norms: str | None = None) -> dict[str, float]:
        """Add the gradient of ``Σ w·term`` (``/ divisor``, ``* scale``) to ``.grad``.

        ``term_norms`` — ``None``: one combined backward, returns ``{}``. Otherwise returns
        ``{term: squared gradient norm}``: ``"accumulate"`` back-propagates the terms one by one
        and adds their gradients (one pass; only for unwrapped modules whose gradients are reduced
        explicitly, as in the RL engine); ``"measure"`` takes each term's gradient without keeping
        it and then runs the combined ``backward`` (needed under DDP, whose gradient all-reduce
        runs inside ``backward`` only).
        """
        weights = weights or {}

        # ×1 and ÷1 are exact in IEEE arithmetic, forward and backward: skipped, not computed
        def scaled(t: torch.Tensor) -> torch.Tensor:
            t = t / divisor if divisor is not None and divisor != 1 else t
            return t * scale if scale is not None and scale != 1 else t

        def weighted(name: str) -> torch.Tensor:
            w = weights.get(name, 1.0)
            return terms[name] if w == 1 else w * terms[name]

        out: dict[str, float] = {}
        if term_norms is not None:
            keep = term_norms == "accumulate"
            names = [n for n in terms if terms[n].requires_grad]  # a constant term adds no gradient
            for i, name in enumerate(names):
                out[name] = self._term_grad(scaled(weighted(name)),
                                            retain=not keep or i + 1 < len(names), keep=keep)
            if keep:
                return out
        total = None  # Σ in term order, as sum() adds them (its leading 0 + t is exact too)
        for name in terms:
            total = weighted(name) if total is None else total + weighted(name)
        scaled(total).backward()
        return out

    def _term_grad(self, loss: torch.Tensor, retain: bool, keep: bool) -> float:
        """Squared norm of ``∇loss`` over the parameters; added to ``.grad`` when ``keep``."""
        params = self.params
        grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
        sq = 0.0
        for p, g in zip(params, grads):
            if g is None:
                continue
            sq += float(g.detach().float().pow(2).sum())
            if keep:
                p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()
        return sq

    def step(self, sync: Callable[[Sequence[torch.Tensor]], None] | None = None) -> dict[str, float]:
        """[sync] → clip → AdamW → LR schedule; returns ``{"grad_norm", "lr"}`` (gradients are kept
        until the next ``zero``)."""
        params = self.params
        if sync is not None:
            sync([p.grad for p in params if p.grad is not None])
        norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, self.oc.max_grad_norm)))
        self.optimizer.step()
        self.scheduler.step()
        return {"grad_norm": norm, "lr": self.scheduler.get_last_lr()[0]}

    def apply_config(self, oc) -> None:
        """Hyper-parameters from ``oc`` (the current config; matters with --allow-config-change)."""
        self.oc = oc
        opt, sched = self.optimizer, self.scheduler
        for group in opt.param_groups:
            group.update(betas=tuple(oc.betas), eps=oc.eps, weight_decay=oc.weight_decay, initial_lr=oc.lr)
        sched.base_lrs = [oc.lr] * len(sched.base_lrs)
        for group, lmbda in zip(opt.param_groups, sched.lr_lambdas):
            group["lr"] = oc.lr * lmbda(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
