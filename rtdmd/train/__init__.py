"""Training stages run by ``python -m rtdmd.train <stage> --config <backbone> [key=value ...]``.

Modules (process group, seeding and collectives live below, in :mod:`rtdmd.dist`): ``roles`` (teacher +
LoRA generator / fake score, DDP / FSDP2 wrapping, ``--init`` artifact stacking), ``checkpoint``
(safetensors + JSON, atomic, ``COMPLETE`` marker, keep_last, local or S3), ``logging`` (rank-0
JSONL/MLflow logger, null logger elsewhere), ``prompts`` (resumable sharded prompt stream),
``base`` (the :class:`~rtdmd.train.base.Trainer` loop), ``cold_start`` (stage 1, AC-DMD).

How to add a stage (e.g. ``rl``)
--------------------------------
1. ``class RLTrainer(Trainer)`` in ``rtdmd/train/rl.py`` with ``stage = "rl"``; register it in
   ``STAGES`` of ``rtdmd/train/__main__.py``.
2. ``stage_config()`` returns the params section (``params.rl``). The base reads from it:
   ``total_steps`` (for RL alias ``epochs`` through a small property/adapter), ``seed``,
   ``log_interval``, ``eval_interval``, ``checkpoint`` (save_interval, keep_last, dir),
   ``generator`` / ``fake_score`` (OptimCfg), ``prompts`` and ``global_batch_size`` (only used by
   the default ``build_data``).
3. ``train_step()``: one iteration (RL: one epoch). ``self.step`` is the 0-based index; use
   ``self.update(role, {term: loss}, weights)`` for every optimizer step (it guards NaN/Inf,
   clips, steps AdamW and the LR schedule and logs grad norms); shared scalars via
   ``rtdmd.dist.broadcast_tensor``; return a flat ``{name: float}`` dict (reduced across
   ranks and logged by the base).
4. Override as needed: ``build_data()`` (RL: the K-repeat sampler; must expose
   ``state_dict()/load_state_dict()``), ``build_ema()`` + ``after_step()`` (RL: ``PolicyEMA``
   stepped per sub-batch — then make ``after_step`` a no-op), ``evaluate()``,
   ``extra_state()`` / ``load_extra_state()`` (JSON dict + tensors: stat trackers, epoch
   counters; saved inside the same atomic checkpoint), ``artifact_fields()`` (e.g. reward
   summary). ``--init URI`` stacking is done by ``roles.build_roles`` for every stage and the
   parent link lands in the artifact manifest automatically.
5. Everything else — process group, seeding, checkpoint/resume with config-hash check, the
   final artifact (generator = EMA shadow, fake score LoRA) — comes from the base.
6. FSDP2 note: a module that ran forward without backward stays unsharded; the base calls
   ``roles.reshard()`` after every ``train_step``, around ``evaluate`` and before saving, so hooks
   see the sharded parameters the optimizers own. Inside a hook, call it yourself before touching
   parameters after a no-grad forward (e.g. swapping EMA weights mid-step).
"""
