"""Trainer base: setup, loop, optimizers, EMA, NaN guard, logging, checkpoint/resume, artifact.

A stage subclasses :class:`Trainer` and overrides narrow hooks (see ``rtdmd/train/__init__.py``):

* ``stage_config()``  -> the params section (needs ``total_steps, seed, log_interval,
  eval_interval, checkpoint, generator, fake_score, prompts, global_batch_size``);
* ``train_step()``    -> one iteration (``self.step`` is the 0-based index), returns metrics;
* ``after_step()``    -> default: generator EMA update (every iteration, §8.3);
* ``build_ema()``, ``build_data()``, ``evaluate()``, ``extra_state()`` / ``load_extra_state()``,
  ``artifact_adapters()`` / ``artifact_fields()``.

Provided: :meth:`update` (NaN/Inf guard → backward → clip ‖∇‖ → AdamW → LR schedule, per-term
gradient norms on log steps), :meth:`broadcast_scalar` helpers via ``rtdmd.train.dist``,
:meth:`save` / :meth:`resume`, :meth:`publish`.

Optimizers: AdamW per trainable role over its LoRA parameters, ``LambdaLR`` with linear
warm-up ``min(1, (k+1)/warmup)`` (departure: the reference's ``k/warmup`` spends its first step
at lr 0; both are constant for warmup 0). Gradient clipping uses the global (sharding-aware)
norm. Seeds: all ranks build models from ``seed`` (identical LoRA init), then reseed
``seed + rank`` for training randomness.

FSDP2: parameters are resharded (``Roles.reshard``) after every step, around evaluation and
before saving/publishing, so hooks always see the sharded parameters the optimizers own.

NaN guard: every loss term is checked before backward; a non-finite term on any rank stops all
ranks with :class:`NonFiniteLossError` naming the step and the term. No checkpoint is written
for that step, so the last good (complete) checkpoint stays the resume point.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from rtdmd.algorithms.ema import ModelEMA
from rtdmd.artifacts.store import join
from rtdmd.config import params_hash
from rtdmd.config.typed import to_mapping
from rtdmd.train import dist as D
from rtdmd.train.checkpoint import (CheckpointError, CheckpointStore, load_optimizer_state, optimizer_state,
                                    prefixed, rng_state, set_rng_state, unprefixed)
from rtdmd.train.logging import build_logger, flatten, log0
from rtdmd.train.roles import TRAINABLE, build_roles, full_tensor


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/Inf; the message names the step and the term."""


@dataclass
class RunOptions:
    out: str
    init: str | None = None
    allow_config_change: bool = False
    max_steps: int | None = None


class Trainer:
    stage = "base"
    trainable = TRAINABLE

    def __init__(self, params, opts: RunOptions, env: D.DistEnv | None = None, logger=None):
        self.params, self.opts = params.for_stage(self.stage), opts
        self.env = env or D.DistEnv()
        self.cfg = self.stage_config()
        self.logger = logger or build_logger(self.env.rank, opts.out, f"{params.name}-{self.stage}")
        self.store = CheckpointStore(self.cfg.checkpoint.dir or join(opts.out, "checkpoints"),
                                     self.cfg.checkpoint.keep_last)
        self.config_hash = params_hash(params)
        self.step = 0
        self._window: dict[str, list[float]] = {}
        self.summary: dict[str, float] = {}

    # ---- hooks -----------------------------------------------------------------------------
    def stage_config(self):
        raise NotImplementedError

    def train_step(self) -> dict[str, float]:
        raise NotImplementedError

    def build_data(self):
        from rtdmd.train.prompts import PromptStream, read_prompt_list

        return PromptStream(read_prompt_list(self.cfg.prompts), self.cfg.global_batch_size,
                            self.env.rank, self.env.world, self.cfg.seed)

    def build_ema(self):
        dtype = torch.bfloat16 if getattr(self.cfg, "ema_dtype", "float32") == "bfloat16" else torch.float32
        return ModelEMA(self.roles.lora_params("generator"), decay=self.cfg.ema_decay,
                        every=self.cfg.ema_every, shadow_dtype=dtype)

    def after_step(self) -> None:
        self.ema.update(self.roles.lora_params("generator"))

    def evaluate(self) -> dict[str, float]:
        return {}

    def milestones(self) -> tuple[int, ...]:
        """Steps at which a complete artifact is published besides the final one (milestones.py)."""
        return ()

    def extra_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {}, {}

    def load_extra_state(self, js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        pass

    def artifact_adapters(self) -> dict:
        from rtdmd.lora.artifact import Adapter
        from rtdmd.lora.core import canonical_key

        lc = self.params.lora
        ema = {canonical_key(k): full_tensor(v).float().cpu() for k, v in self.ema.shadow.items()}
        return {"generator": Adapter(ema, lc.rank, lc.alpha, list(lc.targets)),
                "fake_score": Adapter(self.roles.lora_state("fake_score"), lc.rank, lc.alpha, list(lc.targets))}

    def artifact_fields(self) -> dict[str, Any]:
        m, s = self.params.model, self.params.sampler
        return {
            "stage": self.stage, "backbone": self.params.name,
            "base_model": {"id": m.pretrained, "revision": m.revision, "generator_init": m.generator_init},
            "parent": self.roles.parent or None,
            "sampler": {"nfe": len(s.step_list), "step_list": list(s.step_list), "eta": s.eta,
                        "guidance": s.guidance, "sigmas": self.backbone.sigmas(list(s.step_list))},
            "config_hash": self.config_hash, "data_version": self.data_version(),
            "metrics": self.summary, "steps": self.step, "world_size": self.env.world,
        }

    # ---- setup -----------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        log0(self.env.rank, f"[{self.stage}] {msg}")

    def setup(self) -> None:
        from rtdmd.backbones import build_backbone

        D.seed_everything(self.cfg.seed, 0)  # identical model/LoRA init on every rank
        self.backbone = build_backbone(self.params, self.env.device)
        self.roles = build_roles(self.backbone, self.params, self.env, init_uri=self.opts.init,
                                 roles=self.trainable, log=self.log)
        self.optimizers, self.schedulers = {}, {}
        for role in self.trainable:
            oc = getattr(self.cfg, role)
            opt = torch.optim.AdamW(list(self.roles.lora_params(role).values()), lr=oc.lr,
                                    betas=tuple(oc.betas), eps=oc.eps, weight_decay=oc.weight_decay)
            warm = oc.warmup_steps
            self.optimizers[role] = opt
            self.schedulers[role] = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda k, w=warm: 1.0 if w <= 0 else min(1.0, (k + 1) / w))
        self.ema = self.build_ema()
        self.data = self.build_data()
        D.seed_everything(self.cfg.seed, self.env.rank)
        self.resume()
        self.logger.log_params(to_mapping(self.params))

    # ---- optimisation ---------------------------------------------------------------------------
    def check_finite(self, terms: dict[str, torch.Tensor]) -> None:
        names = list(terms)
        flags = torch.tensor([0.0 if bool(torch.isfinite(terms[n].detach()).all()) else 1.0 for n in names])
        flags = D.all_reduce_max(flags)
        if bool(flags.any()):
            bad = [n for n, f in zip(names, flags.tolist()) if f]
            vals = ", ".join(f"'{n}'={float(terms[n].detach()):.4g}" for n in bad)
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step}: term {vals} (on some rank); training stopped, "
                f"last good checkpoint kept: step {self.store.latest()}")

    def is_log_step(self) -> bool:
        return (self.step + 1) % max(1, self.cfg.log_interval) == 0

    def update(self, role: str, terms: dict[str, torch.Tensor], weights: dict[str, float] | None = None) -> dict[str, float]:
        """Guard → backward of ``Σ w·term`` → clip → AdamW → LR step; returns grad-norm metrics."""
        self.check_finite(terms)
        weights = weights or {}
        opt = self.optimizers[role]
        params = [p for group in opt.param_groups for p in group["params"]]  # FSDP: the sharded ones
        out = {}
        if self.is_log_step() and len(terms) > 1 and self.params.distributed.strategy != "fsdp":
            for name, t in terms.items():  # per-term (local) gradient norms, log steps only
                if t.requires_grad:
                    grads = torch.autograd.grad(weights.get(name, 1.0) * t, params, retain_graph=True, allow_unused=True)
                    out[f"{name}/grad_norm"] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
        loss = sum(weights.get(n, 1.0) * t for n, t in terms.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        oc = getattr(self.cfg, role)
        norm = torch.nn.utils.clip_grad_norm_(params, oc.max_grad_norm)
        opt.step()
        self.schedulers[role].step()
        out[f"{role}/grad_norm"] = float(full_tensor(norm))
        out[f"{role}/lr"] = self.schedulers[role].get_last_lr()[0]
        return out

    # ---- loop ------------------------------------------------------------------------------
    def run(self) -> dict | None:
        t0 = time.time()
        self.setup()
        total = self.cfg.total_steps
        stop = min(total, self.opts.max_steps) if self.opts.max_steps else total
        if self.step == 0 and self.cfg.eval_interval > 0:
            self._log(self._evaluate())
        self._publish_milestone()  # resumed exactly at a milestone that was not published yet
        self.log(f"training steps {self.step} -> {stop} of {total} (world {self.env.world})")
        while self.step < stop:
            metrics = self.train_step()
            self.roles.reshard()
            self.after_step()
            self.step += 1
            for k, v in metrics.items():
                self._window.setdefault(k, []).append(float(v))
            if self.step % max(1, self.cfg.log_interval) == 0 or self.step == stop:
                self._flush(t0)
            if self.cfg.eval_interval > 0 and self.step % self.cfg.eval_interval == 0:
                self._log(self._evaluate())
            if self.step % self.cfg.checkpoint.save_interval == 0 or self.step == stop or self.step in self.milestones():
                self.save()
            self._publish_milestone()
        manifest = None
        if self.step >= total:
            self.summary.update(self._evaluate())
            manifest = self.publish()
        self.logger.close()
        return manifest

    def _evaluate(self) -> dict[str, float]:
        self.roles.reshard()
        try:
            return self.evaluate()
        finally:
            self.roles.reshard()

    def _flush(self, t0: float) -> None:
        means = {k: sum(v) / len(v) for k, v in sorted(self._window.items())}
        self._window = {}
        means = D.reduce_mean(means)
        means["time/elapsed_s"] = time.time() - t0
        self.summary.update({k: v for k, v in means.items() if math.isfinite(v)})
        self._log(means)

    def _log(self, metrics: dict[str, float]) -> None:
        if metrics:
            self.logger.log_metrics(self.step, metrics)

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self) -> None:
        self.roles.reshard()
        js, tens = {}, {}
        for role in self.trainable:
            tens.update(prefixed(f"lora/{role}", self.roles.lora_state(role)))
            names = list(self.roles.lora_params(role))
            ojs, otens = optimizer_state(self.optimizers[role], names)
            js[f"optim/{role}"] = ojs
            tens.update(prefixed(f"optim/{role}", otens))
            js[f"sched/{role}"] = self.schedulers[role].state_dict()  # lr_lambdas are [None]: JSON-safe
        ema_state = self.ema.state_dict()
        tens.update(prefixed("ema", {k: full_tensor(v) for k, v in ema_state.pop("shadow").items()}))
        xjs, xtens = self.extra_state()
        tens.update(prefixed("extra", xtens))
        rjs, rtens = rng_state()
        gathered = D.all_gather_object((rjs, {k: v.clone() for k, v in rtens.items()}))
        if not self.env.is_main:
            D.barrier()
            return
        for r, (_, rt) in enumerate(gathered):
            tens.update(prefixed(f"rng/{r}", rt))
        js.update({"stage": self.stage, "step": self.step, "config_hash": self.config_hash,
                   "config": to_mapping(self.params), "world_size": self.env.world, "ema": ema_state,
                   "data": self.data.state_dict(), "extra": xjs, "rng": [g[0] for g in gathered],
                   "metrics": self.summary})
        uri = self.store.save(self.step, tens, js)
        self.log(f"checkpoint {uri}")
        D.barrier()

    def resume(self) -> None:
        step = self.store.latest()
        if step is None:
            return
        tens, js = self.store.load(step)
        if js.get("stage") != self.stage:
            raise CheckpointError(f"checkpoint step {step} in {self.store.root} is from stage {js.get('stage')!r}, not {self.stage!r}")
        if js["config_hash"] != self.config_hash:
            old, new = flatten(js.get("config", {})), flatten(to_mapping(self.params))
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            msg = (f"checkpoint {self.store.root}/step-{step} was written with a different config "
                   f"(hash {js['config_hash'][:12]} != {self.config_hash[:12]}; changed: {', '.join(diff[:8]) or '?'})")
            if not self.opts.allow_config_change:
                raise CheckpointError(msg + "; refusing to resume — pass --allow-config-change to resume anyway, or use another --out")
            self.log("warning: " + msg + "; resuming anyway (--allow-config-change)")
        for role in self.trainable:
            self.roles.load_lora_state(role, unprefixed(f"lora/{role}", tens))
            load_optimizer_state(self.optimizers[role], self.roles.lora_params(role), js[f"optim/{role}"],
                                 unprefixed(f"optim/{role}", tens))
            self.schedulers[role].load_state_dict(js[f"sched/{role}"])
            self._apply_optim_config(role)
        shadow = unprefixed("ema", tens)
        live = self.ema.shadow
        self.ema.load_state_dict({**js["ema"], "shadow": {k: _like(live[k], v) for k, v in shadow.items()}})
        self.data.load_state_dict(js["data"])
        self.load_extra_state(js["extra"], unprefixed("extra", tens))
        self.summary = dict(js.get("metrics", {}))
        self.step = int(js["step"])
        if js["world_size"] == self.env.world:
            set_rng_state(js["rng"][self.env.rank], unprefixed(f"rng/{self.env.rank}", tens))
        else:
            self.log(f"note: world size changed {js['world_size']} -> {self.env.world}; RNG reseeded")
            D.seed_everything(self.cfg.seed + 1_000_003 * self.step, self.env.rank)
        self.log(f"resumed from {self.store.root}/step-{step}")

    def _apply_optim_config(self, role: str) -> None:
        """Hyper-parameters always come from the current config (matters with --allow-config-change)."""
        oc, sched = getattr(self.cfg, role), self.schedulers[role]
        for group in self.optimizers[role].param_groups:
            group.update(betas=tuple(oc.betas), eps=oc.eps, weight_decay=oc.weight_decay, initial_lr=oc.lr)
        sched.base_lrs = [oc.lr] * len(sched.base_lrs)
        for group, lmbda in zip(self.optimizers[role].param_groups, sched.lr_lambdas):
            group["lr"] = oc.lr * lmbda(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.optimizers[role].param_groups]

    # ---- output --------------------------------------------------------------------------------
    def data_version(self) -> str | None:
        from pathlib import Path

        from rtdmd.artifacts.fs import sha256_file
        from rtdmd.data.formats import resolve_prompt_file

        try:
            return "sha256:" + sha256_file(resolve_prompt_file(Path(self.cfg.prompts), "train"))[:16]
        except Exception:
            return None

    def _publish_milestone(self) -> None:
        from rtdmd.train.milestones import milestone_published, milestone_uri

        if self.step in self.milestones() and not milestone_published(self.opts.out, self.step):
            self.publish(milestone_uri(self.opts.out, self.step), milestone=self.step)

    def publish(self, uri: str | None = None, milestone: int | None = None) -> dict | None:
        from rtdmd.lora.artifact import publish_lora_artifact

        self.roles.reshard()
        adapters = self.artifact_adapters()  # collective under FSDP
        fields = self.artifact_fields()
        if milestone is not None:
            fields["milestone"] = milestone
        manifest = None
        if self.env.is_main:
            uri = uri or join(self.opts.out, "artifact")
            manifest = publish_lora_artifact(uri, adapters, fields)
            self.log(f"artifact {uri}")
        D.barrier()
        return manifest


def _like(ref: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    from rtdmd.train.roles import shard_like

    return shard_like(ref, full)
