"""Trainer base: setup, loop, optimizers, EMA, NaN guard, logging, checkpoint/resume, artifact.

A stage subclasses :class:`Trainer` and overrides narrow hooks (see ``rtdmd/train/__init__.py``):

* ``stage_config()``  -> the stage's typed params section (``self.cfg``);
* ``loop_config()``   -> :class:`LoopConfig`, what the loop reads (steps, seed, intervals,
  checkpointing, per-role optimizer settings);
* ``build_ema()``, ``build_data()`` -> the generator EMA (``update(params, step)``) and the
  resumable data stream (``state_dict()/load_state_dict()``);
* ``build_engine()``  -> optional per-stage state built after the models (RL: the epoch engine);
* ``train_step()``    -> one iteration (``self.step`` is the 0-based index), returns metrics;
* ``evaluate()``, ``extra_state()`` / ``load_extra_state()``, ``artifact_adapters()`` /
  ``artifact_fields()``.

Provided: :meth:`update` (NaN/Inf guard → one :class:`rtdmd.train.optim.RoleOptimizer` step:
backward → clip ‖∇‖ → AdamW → LR schedule, per-term gradient norms on log steps), the generator
EMA update after every step (``ema.update(params, step)``, §8.3), :meth:`save` /
:meth:`resume`, :meth:`publish`.

Optimizers: one :class:`~rtdmd.train.optim.RoleOptimizer` per trainable role (``self.optim``;
``self.optimizers`` / ``self.schedulers`` expose the torch objects).

Seeds: all ranks build models from ``seed`` (identical LoRA init), then reseed the process RNGs
``seed + rank``; the stages' training draws come from streams derived from
``(seed, step[, rank])`` (:func:`rtdmd.dist.derived_generator`), so resuming a step re-draws its
values without RNG state.

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

from rtdmd.artifacts.store import join
from rtdmd.config import params_hash
from rtdmd.config.typed import to_mapping
from rtdmd import dist as D
from rtdmd.progress import postfix, progress
from rtdmd.train.checkpoint import (CheckpointError, CheckpointStore, load_optimizer_state, optimizer_state,
                                    prefixed, rng_state, set_rng_state, unprefixed)
from rtdmd.train.logging import build_logger, flatten, log0
from rtdmd.train.optim import RoleOptimizer
from rtdmd.train.preemption import NoGuard, Preempted, trim_metrics
from rtdmd.train.roles import TRAINABLE, build_roles


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/Inf; the message names the step and the term."""


@dataclass(frozen=True)
class LoopConfig:
    """What the base loop reads of a stage's config (typed; built by ``Trainer.loop_config``)."""

    total_steps: int  # trainer steps (RL: epochs)
    seed: int
    log_interval: int
    eval_interval: int
    checkpoint: Any  # rtdmd.config.schema.CheckpointCfg
    optim: dict[str, Any]  # role -> rtdmd.config.schema.OptimCfg


@dataclass
class RunOptions:
    out: str
    init: str | None = None
    allow_config_change: bool = False
    max_steps: int | None = None


class Trainer:
    stage = "base"
    trainable = TRAINABLE
    guard = NoGuard()  # set by the CLI to a PreemptionGuard (rtdmd.train.preemption)

    def __init__(self, params, opts: RunOptions, env: D.DistEnv | None = None, logger=None):
        self.params, self.opts = params.for_stage(self.stage), opts
        self.env = env or D.DistEnv()
        self.cfg = self.stage_config()
        self.loop = self.loop_config()
        self.logger = logger or build_logger(self.env.rank, opts.out, f"{params.name}-{self.stage}")
        self.store = CheckpointStore(self.loop.checkpoint.dir or join(opts.out, "checkpoints"),
                                     self.loop.checkpoint.keep_last)
        self.config_hash = params_hash(params)
        self.step = 0
        self._window: dict[str, list[float]] = {}
        self.summary: dict[str, float] = {}

    # ---- hooks -----------------------------------------------------------------------------
    def stage_config(self):
        raise NotImplementedError

    def loop_config(self) -> LoopConfig:
        raise NotImplementedError

    def train_step(self) -> dict[str, float]:
        raise NotImplementedError

    def build_data(self):
        raise NotImplementedError

    def build_ema(self):
        raise NotImplementedError

    def build_engine(self) -> None:
        pass

    def after_step(self) -> None:
        """Generator EMA: one ``update`` per trainer step, ``step`` = index of the step just taken."""
        self.ema.update(self.roles.lora_params("generator"), self.step)

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
        ema = {canonical_key(k): D.full_tensor(v).float().cpu() for k, v in self.ema.shadow.items()}
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

        D.seed_everything(self.loop.seed, 0)  # identical model/LoRA init on every rank
        self.backbone = build_backbone(self.params, self.env.device)
        self.roles = build_roles(self.backbone, self.params, self.env, init_uri=self.opts.init,
                                 roles=self.trainable, log=self.log)
        self.optim = {role: RoleOptimizer(self.roles.lora_params(role), self.loop.optim[role])
                      for role in self.trainable}
        self.ema = self.build_ema()
        self.build_engine()
        self.data = self.build_data()
        D.seed_everything(self.loop.seed, self.env.rank)
        self.resume()
        trim_metrics(self.logger, self.step)  # rows a killed run logged after the resume point
        self.logger.log_params(to_mapping(self.params))

    # ---- optimisation ---------------------------------------------------------------------------
    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {role: o.optimizer for role, o in self.optim.items()}

    @property
    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        return {role: o.scheduler for role, o in self.optim.items()}

    def check_finite(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """Stop on a non-finite term (on any rank). Returns the terms' values as python floats
        when all are scalars (read in the same single device→host transfer, so callers log them
        without another sync), else ``{}``."""
        names = list(terms)
        vals = [terms[n].detach() for n in names]
        values: dict[str, float] = {}
        if all(v.dim() == 0 for v in vals):
            values = dict(zip(names, torch.stack(vals).tolist()))
            flags = [0.0 if math.isfinite(v) else 1.0 for v in values.values()]
        else:
            flags = torch.stack([~torch.isfinite(v).all() for v in vals]).float().cpu().tolist()
        if D.is_distributed():
            flags = D.all_reduce_max(torch.tensor(flags)).tolist()
        if any(flags):
            bad = [n for n, f in zip(names, flags) if f]
            vals = ", ".join(f"'{n}'={float(terms[n].detach()):.4g}" for n in bad)
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step}: term {vals} (on some rank); training stopped, "
                f"last good checkpoint kept: step {self.store.latest()}")
        return values

    def is_log_step(self) -> bool:
        return (self.step + 1) % max(1, self.loop.log_interval) == 0

    def update(self, role: str, terms: dict[str, torch.Tensor], weights: dict[str, float] | None = None) -> dict[str, float]:
        """Guard → backward of ``Σ w·term`` → clip → AdamW → LR step; returns the terms' values
        (scalar terms) and the grad-norm metrics."""
        values = self.check_finite(terms)
        opt = self.optim[role]
        split = self.is_log_step() and len(terms) > 1 and self.params.distributed.strategy != "fsdp"
        opt.zero()
        # per-term (local) norms on log steps, measured before the one backward DDP needs
        sq = opt.accumulate(terms, weights, term_norms="measure" if split else None)
        out = dict(values)
        out.update({f"{name}/grad_norm": math.sqrt(v) for name, v in sq.items()})
        m = opt.step()
        out[f"{role}/grad_norm"] = m["grad_norm"]
        out[f"{role}/lr"] = m["lr"]
        return out

    # ---- loop ------------------------------------------------------------------------------
    def run(self) -> dict | None:
        t0 = time.time()
        self.setup()
        total = self.loop.total_steps
        stop = min(total, self.opts.max_steps) if self.opts.max_steps else total
        if self.step == 0 and self.loop.eval_interval > 0:
            self._log(self._evaluate())
        self._publish_milestone()  # resumed exactly at a milestone that was not published yet
        self.log(f"training steps {self.step} -> {stop} of {total} (world {self.env.world})")
        self._bar = progress(stop, self.stage, rank=self.env.rank, initial=self.step, unit="step")
        try:
            while self.step < stop:
                metrics = self.train_step()
                self.roles.reshard()
                self.after_step()
                self.step += 1
                self._bar.update(1)
                for k, v in metrics.items():
                    self._window.setdefault(k, []).append(float(v))
                if self.step % max(1, self.loop.log_interval) == 0 or self.step == stop:
                    self._flush(t0)
                if self.loop.eval_interval > 0 and self.step % self.loop.eval_interval == 0:
                    self._log(self._evaluate())
                saved = (self.step % self.loop.checkpoint.save_interval == 0 or self.step == stop
                         or self.step in self.milestones())
                if saved:
                    self.save()
                self._publish_milestone()
                if self.guard.stop_requested():  # preemption: all ranks stop after this same step
                    self._stop_preempted(saved)
        except BaseException:
            self._bar.disable = True  # a failed stage ends on its error line, not on a progress line
            raise
        self._bar.close()
        manifest = None
        if self.step >= total:
            self.summary.update(self._evaluate())
            manifest = self.publish()
        self.logger.close()
        return manifest

    def _stop_preempted(self, saved: bool) -> None:
        self._bar.close()
        if not saved:
            self.save()
        self.logger.close()
        raise Preempted(self.step, self.guard.signum, self.guard.elapsed())

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
        self._bar.set_postfix(postfix(means), refresh=False)
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
        tens.update(prefixed("ema", {k: D.full_tensor(v) for k, v in ema_state.pop("shadow").items()}))
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
        found = self.store.load_latest(quarantine=self.env.is_main, warn=self.log)  # falls back past corrupt ones
        if found is None:
            return
        step, tens, js = found
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
            self.optim[role].apply_config(self.loop.optim[role])
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
            D.seed_everything(self.loop.seed + 1_000_003 * self.step, self.env.rank)
        self.log(f"resumed from {self.store.root}/step-{step}")

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
    return D.shard_like(ref, full)
