"""Training stages run by ``python -m rtdmd.train <stage> --config <backbone> [key=value ...]``.

Modules (process group, seeding, collectives and derived random streams live below, in
:mod:`rtdmd.dist`): ``roles`` (teacher + LoRA generator / fake score, DDP / FSDP2 wrapping,
``--init`` artifact stacking), ``optim`` (:class:`~rtdmd.train.optim.RoleOptimizer`: the one
optimizer-step sequence), ``checkpoint`` (safetensors + JSON, atomic, ``COMPLETE`` marker,
keep_last, local or S3), ``logging`` (rank-0 JSONL/MLflow logger, null logger elsewhere),
``prompts`` (resumable sharded prompt stream), ``base`` (the :class:`~rtdmd.train.base.Trainer`
loop), ``cold_start`` (stage 1, AC-DMD), ``rl`` + ``rl_core`` / ``rl_terms`` / ``rl_config`` /
``rl_rollout`` (stage 2, RTDMD).

How to add a stage
------------------
1. ``class MyTrainer(Trainer)`` with ``stage = "my_stage"``; register ``"module:Class"`` in
   ``STAGES`` of ``rtdmd/train/__main__.py``.
2. ``stage_config()`` returns the stage's typed params section (``self.cfg``);
   ``loop_config()`` returns a :class:`~rtdmd.train.base.LoopConfig` — ``total_steps`` (RL:
   ``rl.epochs``), ``seed``, ``log_interval``, ``eval_interval``, ``checkpoint`` and ``optim``
   (``{role: OptimCfg}`` for every role in ``trainable``).
3. ``build_ema()`` returns the generator EMA (``update(params, step)``, ``swapped_in``,
   ``state_dict``; :class:`~rtdmd.algorithms.ema.ModelEMA` or ``PolicyEMA``); the base calls
   ``ema.update(generator LoRA, step)`` after every trainer step. ``build_data()`` returns the
   data stream (``state_dict()/load_state_dict()``; saved in every checkpoint).
   ``build_engine()`` (optional) builds per-stage state after the models and optimizers exist
   (RL: the :class:`~rtdmd.train.rl_core.RLEngine`, which owns the K-repeat sampler that
   ``build_data`` then returns).
4. ``train_step()``: one iteration (RL: one epoch). ``self.step`` is the 0-based index. A single
   loss per optimizer step goes through ``self.update(role, {term: loss}, weights)`` (NaN/Inf
   guard, per-term grad norms on log steps, backward, clip, AdamW, LR schedule); a step that
   accumulates several backward calls uses ``self.optim[role]`` directly (``zero`` →
   ``accumulate`` … → ``step``), as the RL engine does. Return a flat ``{name: float}`` dict
   (averaged across ranks and logged by the base).
5. Override as needed: ``evaluate()``, ``extra_state()`` / ``load_extra_state()`` (JSON dict +
   tensors saved inside the same atomic checkpoint), ``artifact_fields()``. ``--init URI``
   stacking is done by ``roles.build_roles`` for every stage and the parent link lands in the
   artifact manifest automatically.
6. Everything else — process group, seeding, checkpoint/resume with config-hash check, the
   final artifact (generator = EMA shadow, fake score LoRA) — comes from the base.
7. FSDP2 note: a module that ran forward without backward stays unsharded; the base calls
   ``roles.reshard()`` after every ``train_step``, around ``evaluate`` and before saving, so hooks
   see the sharded parameters the optimizers own. Inside a hook, call it yourself before touching
   parameters after a no-grad forward (e.g. swapping EMA weights mid-step).
"""
