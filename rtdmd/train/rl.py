r"""Stage 2 — RTDMD: SubGRPO + final-step AC-DMD + reward back-propagation (algorithm.md §6–§9).

``python -m rtdmd.train rl --config params/<backbone>.yaml --init <cold-start artifact> [overrides]``

What this module adds on top of the shared :class:`rtdmd.train.base.Trainer` (checkpoints,
resume, logging, optimizer steps, EMA, artifact publication): the hooks ``loop_config`` (epochs
as trainer steps), ``build_ema`` (policy EMA), ``build_engine`` (the :class:`RLEngine`, built in
``setup``), ``build_data`` (the engine's sampler), ``train_step`` (one epoch). The per-epoch
math lives in :mod:`rtdmd.train.rl_core` (equations, β mapping and every §12 decision are in its
docstring), its generator loss terms in :mod:`rtdmd.train.rl_terms`, the model-free checks in
:mod:`rtdmd.train.rl_config` and the sampler with log-probs in :mod:`rtdmd.train.rl_rollout`.

* **One trainer step = one RL epoch** (§8.4): ``rl.num_batches_per_epoch`` (NB) sampling
  iterations of ``rl.global_sample_batch_size`` images, one fake-score update, advantages, then
  ``G_eff = NB·|all_steps|`` backward calls and exactly one generator optimizer step (the
  reference's layout).  ``rl.epochs`` is the number of trainer steps; ``checkpoint``,
  ``log_interval`` and ``eval_interval`` count epochs.
* **Initialisation** (§8.1): ``--init`` is required.  The artifact chain is fetched and verified
  (every file's sha256 against its manifest, the parent links' manifest sha256, and the manifest
  ``backbone`` against ``params.name``; :func:`rtdmd.lora.artifact.stack_chain`), then every
  generator (resp. fake-score) adapter of the chain is **merged** into a fresh base and a fresh
  trainable LoRA is injected (:func:`rtdmd.lora.stack_and_refresh`; ``lora.reinit_after_merge``
  selects the §12.2 behaviour).  The teacher is a fresh frozen base.
* **Groups** (§6.1): :class:`rtdmd.data.samplers.KRepeatSampler` over the RL prompts; the global
  batch must be a multiple of K and of the world size (checked before any model loads).
* **Rewards**: ``rl.reward_weights`` ``{name: weight}`` through the multi-scorer for the
  advantages; BP uses ``rl.bp.rewards`` or, if empty, the differentiable subset of the training
  rewards (non-differentiable ones feed the advantages only; requesting one for BP is an error).
* **Policy EMA** (§6.7): :class:`rtdmd.algorithms.ema.PolicyEMA` (decay ``rl.ema_decay``,
  interval ``rl.ema_interval``) over the generator LoRA, updated once per optimizer step by the
  base trainer's ``after_step`` (``ema.update(params, n)``; §12.4 decision documented in
  ``rl_core``).  The published generator adapter
  is the EMA shadow; evaluation swaps it in.
* **Checkpoint extra state** (exact resume, §9.3): the K-repeat sampler position (the base's
  ``data`` state), the stat tracker, the engine's epoch / optimizer-step counters; the EMA shadow
  and counters are saved by the base (gathered to full tensors under FSDP, so §12.12 does not
  apply).  All sampling noise, renoising draws and sub-batch permutations are derived from
  ``(rl.seed, epoch, …)``, so a resumed epoch re-draws exactly what the interrupted one drew.
* **Output**: ``<out>/artifact`` with the generator EMA LoRA and the fake-score LoRA; manifest
  ``stage: rl``, ``parent: {uri, manifest_sha256}`` of the init artifact (so
  ``stack_chain(rl_artifact)`` returns ``[cold_start, rl]``), the implied β values and the
  reward configuration.

Distribution: ``distributed.strategy`` ``none``/``ddp`` — forwards go through the unwrapped
modules and the LoRA gradients are averaged across ranks once per epoch (one all-reduce of the
small LoRA tensors instead of DDP hooks on NB·|steps| backward calls); ``fsdp`` — FSDP2 reduces
gradients itself (gradient sync enabled only on the last backward of the epoch).
"""
from __future__ import annotations

from typing import Any

import torch

from rtdmd import dist as D
from rtdmd.algorithms.ema import PolicyEMA
from rtdmd.train.base import LoopConfig, Trainer
from rtdmd.train.milestones import check_init_milestone
from rtdmd.train.rl_config import RLConfigError, load_rl_prompts, parse_prompt_items, validate_rl_config
from rtdmd.train.rl_core import RLEngine, RLNets

__all__ = ["RLTrainer", "load_rl_prompts", "validate_rl_config", "main_rl"]


class RLTrainer(Trainer):
    stage = "rl"

    # ---- hooks ---------------------------------------------------------------------------------
    def stage_config(self):
        return self.params.rl

    def loop_config(self) -> LoopConfig:
        """The base loop's vocabulary on the epoch-based RL config: one trainer step = one epoch."""
        rl = self.params.rl
        return LoopConfig(total_steps=rl.epochs, seed=rl.seed, log_interval=rl.log_interval,
                          eval_interval=rl.eval_interval, checkpoint=rl.checkpoint,
                          optim={"generator": rl.generator, "fake_score": rl.fake_score})

    def setup(self) -> None:
        if not self.opts.init:
            raise RLConfigError("the rl stage needs --init <cold-start LoRA artifact URI> (the output of "
                                "`python -m rtdmd.train cold_start`)")
        validate_rl_config(self.params, self.env.world)  # fail before any model loads
        check_init_milestone(self.opts.init, self.params.rl.init_milestone)
        rl = self.params.rl  # periodic-evaluation prompts: the rl.eval_split split of rl.prompts
        self.eval_items = load_rl_prompts(rl.prompts, "test") if rl.eval_split == "test" else None
        super().setup()

    def build_ema(self):
        """Policy EMA (§6.7), updated by :meth:`after_step` once per optimizer step (§12.4)."""
        rl = self.params.rl
        return PolicyEMA(self.roles.lora_params("generator"), decay=rl.ema_decay, interval=rl.ema_interval)

    def after_step(self) -> None:
        """``rl.ema_cadence`` (§12.4). ``optimizer_step``: one update, ``n`` = index of the step just
        taken. ``sub_batch`` (the reference): the reference calls ``step(n)`` after each of its NB
        sub-batches with ``n`` = optimizer steps so far, so the weights after ``k`` steps receive
        NB consecutive updates with ``n = k`` (the last sub-batch of one epoch plus the NB−1 first
        ones of the next, with no optimizer step in between)."""
        params = self.roles.lora_params("generator")
        if self.params.rl.ema_cadence == "sub_batch":
            self.ema.update(params, self.step + 1, repeats=self.params.rl.num_batches_per_epoch)
        else:
            self.ema.update(params, self.step)

    def build_engine(self) -> None:
        """The epoch engine over the trainer's roles and optimizers (it owns the K-repeat sampler)."""
        roles = self.roles
        nets = RLNets(
            teacher=roles.teacher, generator=roles.raw["generator"], fake_score=roles.raw["fake_score"],
            gen_params=roles.lora_params("generator"), fake_params=roles.lora_params("fake_score"),
            gen_opt=self.optim["generator"], fake_opt=self.optim["fake_score"])
        fsdp = self.env.initialized and self.params.distributed.strategy == "fsdp"
        self.engine = RLEngine(
            self.params, self.backbone, nets, prompts=load_rl_prompts(self.params.rl.prompts, "train"),
            comm=D.comm_for(self.env), grad_sync=None if fsdp else "all_reduce", autocast=roles.autocast,
            check_finite=self.check_finite)
        for name in self.engine.warnings:
            self.log(f"warning: {name}")

    def build_data(self):
        """The engine's K-repeat sampler: the base checkpoints its position with every checkpoint."""
        return self.engine.sampler

    def train_step(self) -> dict[str, float]:
        if self.engine.epoch != self.step:
            raise RuntimeError(f"RL engine epoch {self.engine.epoch} != trainer step {self.step}")
        return self.engine.run_epoch(log=self.is_log_step())

    def extra_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        state = self.engine.state_dict()
        state.pop("sampler")  # saved by the base as the data position
        return {"engine": state}, {}

    def load_extra_state(self, js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.engine.load_state_dict({**js["engine"], "sampler": self.data.state_dict()})

    def artifact_fields(self) -> dict[str, Any]:
        fields = super().artifact_fields()
        rl = self.params.rl
        eng = self.engine
        fields["rl"] = {
            "reward_weights": dict(rl.reward_weights), "bp_rewards": dict(eng.bp_weights) if eng.bp_active else {},
            "last_step_loss": rl.last_step.loss, "last_step_weight": rl.last_step.weight,
            "policy_gradient": rl.policy_gradient, "epochs": self.step,
            "implied_beta_bp": (rl.bp.grad_scale / rl.last_step.weight
                                if eng.bp_active and eng.dm_active and rl.last_step.weight > 0 else None),
        }
        return fields

    # ---- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """EMA generator, K CPS steps at ``sampler.eta`` (§12.13), fixed seed; mean rewards."""
        from rtdmd.sampling import generate

        eng, sp, ev = self.engine, self.params.sampler, self.params.eval
        texts, metadata = (parse_prompt_items(self.eval_items) if self.eval_items is not None
                           else (eng.prompts, eng.metadata))
        unique = list(dict.fromkeys(texts))[: max(1, ev.num_prompts)]
        per = max(1, ev.batch_size // len(unique))
        prompts = [p for p in unique for _ in range(per)]
        md_of = {p: m for p, m in zip(texts, metadata)}
        seed = ev.seed + 7919 * self.env.rank
        net = self.roles.raw["generator"]
        outs: dict[str, list[torch.Tensor]] = {}
        with self.ema.swapped_in(self.roles.lora_params("generator")):
            for start in range(0, len(prompts), ev.batch_size):
                chunk = prompts[start:start + ev.batch_size]
                with self.roles.autocast():
                    x = generate(self.backbone, net, chunk, step_list=list(sp.step_list), eta=sp.eta,
                                 seed=seed + start)
                md = [md_of[p] for p in chunk]
                r = eng.reward_fn(x.float(), chunk, md if any(m is not None for m in md) else None)
                for k, v in r.items():
                    outs.setdefault(k, []).append(v.float().cpu())
        metrics = {f"eval/reward/{k}": float(torch.cat(v).mean()) for k, v in outs.items()
                   if k in eng.reward_fn.weights or k == "mean"}
        return D.reduce_mean(metrics)


def main_rl(params, opts, env=None, logger=None) -> dict | None:
    """Run the RL stage (the entry point's ``rl`` subcommand)."""
    return RLTrainer(params, opts, env=env, logger=logger).run()
