"""Convert the reference implementation's config files into one params file.

``rtdmd params import-reference COLD_START.yaml RTDMD.yaml [--inference INF.yaml] --out FILE``

The reference splits a recipe over a stage-1 file (``model / dmd / ac_dmd / solver / train /
distributed / eval``), a stage-2 file (``model / grpo / dmd / solver / train / distributed /
eval``) and an inference file. Every key of those files is handled by exactly one rule below:

* **mapped** to a params field (possibly through a conversion: per-GPU batch × GPU count → a
  global batch, ``beta1/beta2`` → ``betas``, ``checkpoint-N/...`` → ``rl.init_milestone``);
* **same** — must equal a value already mapped (the stage-2 file repeats the model, step list,
  η, ...); a disagreement is an error naming both keys;
* **fixed** — the project implements exactly one value (e.g. ``sde_type: cps``); any other value
  is an error saying what is supported;
* **ignored** — deployment or logging settings with no effect on the trained numbers (paths,
  run names, W&B project, image counts for logging); each one is reported as a note.

A key that matches no rule is an error listing every such key: nothing is dropped silently.
Fields the reference files do not carry (registry gates, compute resources, eval caps) come
from the project's defaults; ``tests/foundation/test_reference_import.py`` compares the
converted five paper backbones with ``params/<backbone>.yaml`` field by field, apart from the
rows of ``docs/reference_departures.md``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from rtdmd.config.reference_rules import SHARDING, Builder, _dtype, _family, _milestone, _prompts, _read
from rtdmd.config.typed import ConfigError

def _model(b: Builder) -> None:
    b.map("cs", "model.model_type", "model.family", lambda v: _family(v))
    b.map("cs", "model.pretrained_path", "model.pretrained")
    b.set("model.revision", None, "cs", "model.pretrained_path")
    b.map("cs", "model.generator_init_path", "model.generator_init", lambda v: v or None, default=None)
    b.map("cs", "model.image_resolution", "model.resolution", int)
    b.map("cs", "model.dtype", "model.dtype", _dtype)
    b.map("cs", "model.fsdp_patch_embed_linear", "model.patch_embed_linear", bool, default=False)
    b.map("cs", "model.gradient_checkpointing", "distributed.gradient_checkpointing", bool)
    # §12.6: the reference quantises the FLUX timestep to bf16
    b.set("model.quantize_timestep", b.value("model.family") in ("flux2_klein", "flux1"), "cs", "model.model_type")
    for f in ("cs", "rl"):
        for key in ("model.fake_score_init_path", "model.teacher_init_path"):
            if b.has(f, key) and b.files[f][key] not in ("", b.value("model.pretrained")):
                raise ConfigError(f"{b.sources[f]}: '{key}' = {b.files[f][key]!r} differs from the base model; "
                                  f"a separate fake-score/teacher base is not supported")
            b.used[f].add(key)
    for key, field, conv in (("model.model_type", "model.family", _family),
                             ("model.pretrained_path", "model.pretrained", str),
                             ("model.generator_init_path", "model.generator_init", lambda v: v or None),
                             ("model.image_resolution", "model.resolution", int),
                             ("model.dtype", "model.dtype", _dtype),
                             ("model.fsdp_patch_embed_linear", "model.patch_embed_linear", bool),
                             ("model.gradient_checkpointing", "distributed.gradient_checkpointing", bool)):
        b.same("rl", key, field, conv)


def _lora(b: Builder) -> None:
    g = "model.generator_lora."
    b.fixed("cs", g + "enabled", True, "the generator is always a LoRA")
    b.map("cs", g + "rank", "lora.rank", int)
    b.map("cs", g + "lora_alpha", "lora.alpha", float)
    b.map("cs", g + "target_modules", "lora.targets", list)
    b.map("cs", g + "init_lora_weights", "lora.init", str)
    b.fixed("cs", g + "load_path", "", "stage 1 starts from fresh adapters; use --init to stack")
    for f in ("cs", "rl"):
        for role in ("generator_lora", "fake_score_lora"):
            p = f"model.{role}."
            if f == "cs" and role == "generator_lora":
                continue
            b.fixed(f, p + "enabled", True, "both roles train a LoRA")
            b.same(f, p + "rank", "lora.rank", int)
            b.same(f, p + "lora_alpha", "lora.alpha", float)
            b.same(f, p + "target_modules", "lora.targets", list)
            b.same(f, p + "init_lora_weights", "lora.init", str)
            if f == "cs":
                b.fixed(f, p + "load_path", "", "stage 1 starts from fresh adapters")
            else:
                b.fixed(f, p + "merge_before_training", True, "stage 2 merges the stage-1 adapters (§8.1)")
    gen = _milestone(b.get("rl", "model.generator_lora.load_path"))
    fake = _milestone(b.get("rl", "model.fake_score_lora.load_path"))
    if gen != fake:
        raise ConfigError(f"{b.sources['rl']}: generator and fake-score load_path name different stage-1 steps "
                          f"({gen} != {fake})")
    b.set("rl.init_milestone", gen, "rl", "model.generator_lora.load_path")
    # §12.1: the reference's LoRA tensors (hence AdamW state and EMA) have the model's dtype
    b.set("lora.master_dtype", "bfloat16" if _dtype(b.get("cs", "model.dtype")) == "bfloat16" else "float32",
          "cs", "model.dtype")
    # §12.2: after merging, the reference re-initialises A ~ N(0, 1)
    b.set("lora.reinit_after_merge", "reference", "rl", "model.generator_lora.merge_before_training")


def _sampler_and_dmd(b: Builder) -> None:
    b.map("cs", "dmd.denoising_step_list", "sampler.step_list", list)
    b.same("cs", "dmd.num_inference_steps", "sampler.step_list", _n_steps_of(b))
    b.fixed("cs", "dmd.generator_scheduler", "cps", "the generator samples with CPS (§2.1)")
    b.map("cs", "dmd.cps_eta", "sampler.eta", float)
    b.fixed("cs", "dmd.num_train_timesteps", 1000, "the 1000-entry training sigma table (§1.5)")
    b.map("cs", "dmd.min_step", "dmd.min_step", int)
    b.map("cs", "dmd.max_step", "dmd.max_step", int)
    b.map("cs", "dmd.dmd_timestep_sampling", "dmd.timestep_sampling", str)
    b.map("cs", "dmd.dmd_logit_mean", "dmd.logit_mean", float)
    b.map("cs", "dmd.dmd_logit_std", "dmd.logit_std", float)
    b.map("cs", "dmd.gradient_normalization", "dmd.gradient_normalization", bool)
    # plain-DMD fake-score timesteps (§4.2): logit-normal over [0, 999] with dmd.logit_mean/std
    b.fixed("cs", "dmd.fake_timestep_sampling", "logit_normal", "plain-DMD fake-score timesteps (§4.2)")
    b.same("cs", "dmd.logit_mean", "dmd.logit_mean", float)
    b.same("cs", "dmd.logit_std", "dmd.logit_std", float)
    b.fixed("cs", "dmd.fake_min_step", 0, "fake-score timesteps span the whole table (§4.2)")
    b.fixed("cs", "dmd.fake_max_step", 999, "fake-score timesteps span the whole table (§4.2)")
    b.fixed("cs", "dmd.fake_guidance_scale", 1.0, "the fake score runs without CFG (§4.1)")
    b.fixed("cs", "dmd.fake_train_guidance_scale", 1.0, "the fake score trains without CFG (§4.1)")
    b.map("cs", "dmd.fake_update_ratio", "cold_start.fake_update_ratio", int)
    b.map("cs", "dmd.random_stop_idx", "cold_start.random_stop", bool)
    lo, hi = b.get("cs", "dmd.real_guidance_scale_min"), b.get("cs", "dmd.real_guidance_scale_max")
    b.set("cold_start.teacher_guidance", [float(lo), float(hi)], "cs", "dmd.real_guidance_scale_min/max")
    if lo != hi:
        raise ConfigError(f"{b.sources['cs']}: real_guidance_scale_min != max ({lo} != {hi}); sampler.teacher_guidance "
                          f"(the evaluation teacher) needs one value")
    b.set("sampler.teacher_guidance", float(lo), "cs", "dmd.real_guidance_scale_min")
    b.set("sampler.log_prob", "simplified", "rl", "grpo.sde_type")  # §2.2, the reference's log-prob
    for key, field, conv in (("dmd.denoising_step_list", "sampler.step_list", list),
                             ("dmd.cps_eta", "sampler.eta", float)):
        b.same("rl", key, field, conv)
    b.same("rl", "dmd.num_inference_steps", "sampler.step_list", _n_steps_of(b))
    b.fixed("rl", "dmd.generator_scheduler", "cps", "the generator samples with CPS (§2.1)")


def _n_steps_of(b: Builder) -> Callable[[Any], Any]:
    """A step count compared with the step list: returns the list when the counts agree."""
    return lambda n: b.value("sampler.step_list") if int(n) == len(b.value("sampler.step_list")) else int(n)


def _ac_dmd(b: Builder) -> None:
    a = "ac_dmd."
    b.map("cs", a + "enabled", "ac_dmd.enabled", bool)
    b.map("cs", a + "start_mode", "ac_dmd.start_mode", str)
    b.map("cs", a + "boundary_sigma_index", "ac_dmd.boundary_index", int)
    b.map("cs", a + "end_timestep", "ac_dmd.end_timestep", float)
    b.map("cs", a + "timestep_offset", "ac_dmd.offset", float)
    b.map("cs", a + "min_renoise_step", "ac_dmd.min_renoise_step", float)
    b.map("cs", a + "max_renoise_step", "ac_dmd.max_renoise_step", float)
    b.map("cs", a + "target_formula_move_scale_out", "ac_dmd.move_scale_out", bool)
    lo, hi = b.get("cs", a + "fake_loss_weight_clamp_min"), b.get("cs", a + "fake_loss_weight_clamp_max")
    b.set("ac_dmd.weight_clamp", [float(lo), float(hi)], "cs", a + "fake_loss_weight_clamp_min/max")
    b.fixed("cs", a + "all_include_terminal_when_no_random_stop", True,
            "without random stop every step, the terminal one included, is trained (§3.1)")
    b.map("cs", a + "consistency_enabled", "consistency.enabled", bool)
    b.map("cs", a + "consistency_weight", "consistency.weight", float)
    b.map("cs", a + "consistency_epsilon_timestep", "consistency.eps_timestep", float)
    b.map("cs", a + "consistency_num_steps", "consistency.num_moves", int)
    b.map("cs", a + "consistency_use_two_sample_unbiased", "consistency.two_sample", bool)
    b.map("cs", a + "consistency_stopgrad_transitions", "consistency.stopgrad_transitions", bool)


def _optim(b: Builder, f: str, prefix: str, field: str, names: dict[str, str]) -> None:
    b.map(f, prefix + names["lr"], f"{field}.lr", float)
    b1, b2 = b.get(f, prefix + names["beta1"]), b.get(f, prefix + names["beta2"])
    b.set(f"{field}.betas", [float(b1), float(b2)], f, prefix + "beta1/beta2")
    b.map(f, prefix + names["eps"], f"{field}.eps", float)
    b.map(f, prefix + names["weight_decay"], f"{field}.weight_decay", float)
    b.map(f, prefix + names["max_grad_norm"], f"{field}.max_grad_norm", float)
    if names.get("warmup_steps"):
        b.map(f, prefix + names["warmup_steps"], f"{field}.warmup_steps", int)
    else:
        b.set(f"{field}.warmup_steps", 0, f, prefix + names["lr"])


SOLVER = {k: k for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm", "warmup_steps")}
GRPO_OPT = {"lr": "learning_rate", "beta1": "adam_beta1", "beta2": "adam_beta2", "eps": "adam_epsilon",
            "weight_decay": "adam_weight_decay", "max_grad_norm": "max_grad_norm", "warmup_steps": ""}


def _cold_start(b: Builder, gpus: int) -> None:
    _optim(b, "cs", "solver.generator.", "cold_start.generator", SOLVER)
    _optim(b, "cs", "solver.fake_score.", "cold_start.fake_score", SOLVER)
    t = "train."
    b.map("cs", t + "total_steps", "cold_start.total_steps", int)
    b.map("cs", t + "save_interval", "cold_start.checkpoint.save_interval", int)
    b.map("cs", t + "log_interval", "cold_start.log_interval", int)
    b.map("cs", t + "seed", "cold_start.seed", int)
    b.map("cs", t + "batch_size", "cold_start.global_batch_size", lambda v: int(v) * gpus)
    b.fixed("cs", t + "gradient_accumulation_steps", 1, "unused by the reference's stage 1 (§12.9)")
    b.map("cs", t + "autocast_dtype", "distributed.mixed_precision", lambda v: {"bf16": "bf16", "fp16": "fp16",
                                                                                "fp32": "fp32"}[v])
    b.fixed("cs", t + "resume_from", "", "resume is automatic from the latest complete checkpoint under --out")
    b.fixed("cs", t + "use_ema", True, "the published stage-1 generator is its EMA (§8.3)")
    b.map("cs", t + "ema_decay", "cold_start.ema_decay", float)
    b.map("cs", t + "ema_every", "cold_start.ema_every", int)
    # §12.3: the reference's EMA shadow has the model's dtype
    b.set("cold_start.ema_dtype", "bfloat16" if b.value("model.dtype") == "bfloat16" else "float32", "cs", "model.dtype")
    b.set("cold_start.milestones", [b.value("rl.init_milestone")], "rl", "model.generator_lora.load_path")
    b.map("cs", "prompt_path", "cold_start.prompts", _prompts)
    b.map("cs", "distributed.strategy", "distributed.strategy", str)
    b.map("cs", "distributed.fsdp_sharding", "distributed.fsdp_sharding", lambda v: SHARDING[v],
          default="full_shard")
    b.fixed("cs", "eval.enabled", True, "periodic evaluation (eval_interval 0 turns it off)")
    b.map("cs", "eval.eval_interval", "cold_start.eval_interval", int)
    b.same("cs", "eval.eval_num_steps", "sampler.step_list", _n_steps_of(b))
    b.fixed("cs", "eval.eval_guidance_scale", 1.0, "the generator samples without CFG")
    b.map("cs", "eval.eval_batch_size", "eval.batch_size", int)
    b.map("cs", "eval.eval_seed", "eval.seed", int)
    b.ignore("cs", "eval.reward_fn", "stage-1 periodic evaluation scores eval.rewards (the stage-2 set)")
    b.ignore("cs", "eval.reward_dataset_map", "stage-1 periodic evaluation uses eval.reward_dataset_map")


def _rl(b: Builder, gpus: int) -> None:
    g = "grpo."
    b.fixed("rl", g + "sampling_mode", "dmd", "stage-2 rollouts follow the generator's CPS steps (§6.2)")
    b.fixed("rl", g + "sde_type", "cps", "CPS transitions (§2.2)")
    b.same("rl", g + "num_steps", "sampler.step_list", _n_steps_of(b))
    b.same("rl", g + "denoising_step_list", "sampler.step_list", list)
    b.same("rl", g + "noise_level", "sampler.eta", float)
    b.map("rl", g + "guidance_scale", "sampler.guidance", float)
    b.fixed("rl", g + "same_latent", False, "every sample draws its own initial noise (§6.2)")
    b.same("rl", g + "eval_num_steps", "sampler.step_list", _n_steps_of(b))
    b.same("rl", g + "eval_guidance_scale", "sampler.guidance", float)
    b.same("rl", g + "eval_noise_level", "sampler.eta", float)  # §12.13: evaluation samples with η
    b.fixed("rl", g + "eval_sde_type", "cps", "CPS transitions (§2.2)")
    b.map("rl", g + "eval_freq", "rl.eval_interval", int)
    b.set("rl.eval_split", "test", "rl", g + "eval_freq")  # the reference evaluates on the test split
    b.map("rl", g + "save_freq", "rl.checkpoint.save_interval", int)
    b.map("rl", g + "clip_range_lt", "rl.clip_range_low", float)
    b.map("rl", g + "clip_range_gt", "rl.clip_range_high", float)
    b.ignore("rl", g + "clip_range", "superseded by clip_range_lt / clip_range_gt in the reference's PPO loss")
    b.map("rl", g + "beta", "rl.kl_beta", float)
    b.map("rl", g + "adv_clip_max", "rl.adv_clip_max", float)
    b.map("rl", g + "timestep_fraction", "rl.timestep_fraction", float)
    b.fixed("rl", g + "num_inner_epochs", 1, "one optimizer step per epoch (§6.6)")
    b.fixed("rl", g + "cfg_in_training", False, "the generator trains without CFG")
    _optim(b, "rl", g, "rl.generator", GRPO_OPT)
    b.map("rl", g + "weight_advantages", "rl.weight_advantages", bool)
    b.map("rl", g + "reward_fn", "rl.reward_weights", lambda v: {str(k): float(w) for k, w in v.items()})
    b.ignore("rl", g + "reward_ckpt_path", "path")
    b.fixed("rl", g + "per_prompt_stat_tracking", True, "advantages are normalised per prompt (§6.4)")
    b.map("rl", g + "per_prompt_global_std", "rl.global_std", bool)
    b.map("rl", g + "num_batches_per_epoch", "rl.num_batches_per_epoch", int)
    b.map("rl", g + "sample_batch_size", "rl.global_sample_batch_size", lambda v: int(v) * gpus)
    b.map("rl", g + "num_image_per_prompt", "rl.num_images_per_prompt", int)
    b.ignore("rl", g + "test_batch_size", "evaluation batch size: eval.batch_size (from the stage-1 file)")
    b.ignore("rl", g + "vae_decode_batch_size", "a memory knob of the reference's decoder loop; decoding "
                                                  "here is chunked by rl.bp.batch_size")
    _same_int(b, g + "train_batch_size", g + "sample_batch_size",
              "the training micro-batch is the sampling batch (§12.9)")
    _same_int(b, g + "gradient_accumulation_steps", g + "num_batches_per_epoch",
              "one optimizer step per epoch accumulates every sub-batch (§6.6)")
    b.map("rl", g + "num_epochs", "rl.epochs", int)
    b.fixed("rl", g + "use_ema", True, "the published stage-2 generator is its EMA (§6.7)")
    b.map("rl", g + "ema_decay", "rl.ema_decay", float)
    b.map("rl", g + "ema_update_interval", "rl.ema_interval", int)
    b.set("rl.ema_cadence", "sub_batch", "rl", g + "use_ema")  # §12.4: the reference steps it per sub-batch
    b.ignore("rl", g + "log_num_groups", "logging")
    s = g + "step_selection."
    b.map("rl", s + "enabled", "rl.step_selection.enabled", bool)
    b.map("rl", s + "range_start", "rl.step_selection.range_start", int)
    b.map("rl", s + "range_end", "rl.step_selection.range_end", int)
    b.map("rl", s + "num_train_steps", "rl.step_selection.num_steps", int)
    _last_step(b)
    _optim(b, "rl", "solver.fake_score.", "rl.fake_score", SOLVER)
    b.map("rl", "train.seed", "rl.seed", int)
    b.same("rl", "train.autocast_dtype", "distributed.mixed_precision", str)
    b.map("rl", "prompt_path", "rl.prompts", _prompts)
    b.map("rl", "distributed.strategy", "rl.distributed.strategy", str)
    b.map("rl", "distributed.fsdp_sharding", "rl.distributed.fsdp_sharding", lambda v: SHARDING[v],
          default="full_shard")


def _same_int(b: Builder, key: str, other: str, why: str) -> None:
    if b.has("rl", key) and int(b.get("rl", key)) != int(b.get("rl", other)):
        raise ConfigError(f"{b.sources['rl']}: '{key}' = {b.files['rl'][key]} must equal '{other}' = "
                          f"{b.files['rl'][other]} ({why})")
    b.used["rl"].add(key)


def _last_step(b: Builder) -> None:
    p = "grpo.last_step_loss."
    enabled = bool(b.get("rl", p + "enabled"))
    loss = str(b.get("rl", p + "loss_type"))
    b.set("rl.last_step.loss", loss if enabled else "none", "rl", p + "loss_type")
    b.map("rl", p + "train_steps", "rl.last_step.train_steps", list)
    b.map("rl", p + "weight", "rl.last_step.weight", float)
    lo, hi = b.get("rl", p + "real_guidance_scale_min"), b.get("rl", p + "real_guidance_scale_max")
    b.set("rl.teacher_guidance", [float(lo), float(hi)], "rl", p + "real_guidance_scale_min/max")
    b.fixed("rl", p + "fake_guidance_scale", 1.0, "the fake score runs without CFG (§4.1)")
    b.fixed("rl", p + "ac_fake_train_guidance_scale", 1.0, "the fake score trains without CFG (§4.1)")
    b.same("rl", p + "gradient_normalization", "dmd.gradient_normalization", bool)
    b.same("rl", p + "min_step", "dmd.min_step", int)
    b.same("rl", p + "max_step", "dmd.max_step", int)
    # timestep draws of the plain-DMD last-step loss (§7.2): only read when loss_type is dmd
    for key in ("timestep_sampling", "logit_mean", "logit_std", "fake_min_step", "fake_max_step",
                "fake_timestep_sampling", "fake_logit_mean", "fake_logit_std"):
        if loss == "ac_dmd":
            b.ignore("rl", p + key, "a plain-DMD setting; with loss_type ac_dmd the timesteps are the AC "
                                    "renoise draws (§5.2)")
        else:
            raise ConfigError(f"{b.sources['rl']}: '{p}loss_type: {loss}' is not supported for import; "
                              f"expected ac_dmd (the released objective)")
    b.map("rl", p + "fake_score_batch_size", "rl.fake_score_batch_size", int)
    for key, field, conv in (("ac_start_mode", "ac_dmd.start_mode", str), ("ac_end_timestep", "ac_dmd.end_timestep", float),
                             ("ac_timestep_offset", "ac_dmd.offset", float),
                             ("ac_min_step", "ac_dmd.min_renoise_step", float),
                             ("ac_max_step", "ac_dmd.max_renoise_step", float),
                             ("ac_target_formula_move_scale_out", "ac_dmd.move_scale_out", bool),
                             ("ac_consistency_weight", "consistency.weight", float),
                             ("ac_consistency_epsilon_timestep", "consistency.eps_timestep", float),
                             ("ac_consistency_num_steps", "consistency.num_moves", int),
                             ("ac_consistency_use_two_sample_unbiased", "consistency.two_sample", bool),
                             ("ac_consistency_stopgrad_transitions", "consistency.stopgrad_transitions", bool)):
        b.same("rl", p + key, field, conv)
    clamp = [float(b.get("rl", p + "ac_fake_loss_weight_clamp_min")), float(b.get("rl", p + "ac_fake_loss_weight_clamp_max"))]
    if clamp != b.value("ac_dmd.weight_clamp"):
        raise ConfigError(f"{b.sources['rl']}: ac_fake_loss_weight_clamp {clamp} disagrees with stage 1's "
                          f"{b.value('ac_dmd.weight_clamp')} (params has one ac_dmd.weight_clamp)")
    b.map("rl", p + "ac_consistency_enabled", "rl.last_step.consistency", bool)
    b.map("rl", p + "bp_enabled", "rl.bp.enabled", bool)
    b.fixed("rl", p + "bp_use_training_reward_fn", True, "BP scores the differentiable training rewards "
                                                           "(rl.bp.rewards empty)")
    b.set("rl.bp.rewards", {}, "rl", p + "bp_use_training_reward_fn")
    b.map("rl", p + "bp_reward_margin", "rl.bp.margin", float)
    b.map("rl", p + "bp_grad_scale", "rl.bp.grad_scale", float)
    b.map("rl", p + "bp_only_deterministic", "rl.bp.deterministic_only", bool)
    b.map("rl", p + "bp_batch_size", "rl.bp.batch_size", int, default=0)


def _eval(b: Builder) -> None:
    for f in ("cs", "rl"):
        b.fixed(f, "eval.eval_prompt_source", "dataset", "evaluation prompts come from the prepared datasets")
        b.ignore(f, "eval.dataset", "the evaluation dataset of each reward is eval.reward_dataset_map")
        b.ignore(f, "eval.dataset_path", "path")
        b.ignore(f, "eval.reward_ckpt_path", "path")
        b.ignore(f, "eval.num_media_images", "media")
        b.ignore_prefix(f, "logging.", "logging")
        b.ignore(f, "output_dir", "path")
    b.fixed("rl", "eval.enabled", True, "periodic evaluation (eval_interval 0 turns it off)")
    b.map("rl", "eval.reward_fn", "eval.rewards", lambda v: {str(k): float(w) for k, w in v.items()})
    b.map("rl", "eval.reward_dataset_map", "eval.reward_dataset_map", lambda v: {str(k): str(d) for k, d in v.items()})
    b.same("rl", "eval.eval_seed", "eval.seed", int)


def _inference(b: Builder) -> None:
    f = "inf"
    base = b.value("model.generator_init") or b.value("model.pretrained")
    if b.get(f, "pretrained_path") != base:
        raise ConfigError(f"{b.sources[f]}: 'pretrained_path' = {b.files[f]['pretrained_path']!r} is neither the "
                          f"generator init nor the base model ({base!r})")
    b.same(f, "model_type", "model.family", _family)
    b.same(f, "dtype", "model.dtype", _dtype)
    b.ignore(f, "image_resolution", "inference resolution is chosen at inference time (rtdmd infer --resolution)")
    b.fixed(f, "mode", "distilled", "few-step CPS sampling of the trained generator")
    b.ignore(f, "lora_paths", "path")
    b.same(f, "lora_rank", "lora.rank", int)
    b.same(f, "lora_alpha", "lora.alpha", float)
    b.same(f, "num_steps", "sampler.step_list", _n_steps_of(b))
    b.same(f, "denoising_step_list", "sampler.step_list", list)
    b.same(f, "cps_eta", "sampler.eta", float)
    b.same(f, "guidance_scale", "sampler.guidance", float)
    b.same(f, "seed", "eval.seed", int)
    b.ignore(f, "batch_size", "an inference batch size, not a recipe setting")
    b.fixed(f, "eval_prompt_source", "dataset", "evaluation prompts come from the prepared datasets")
    b.ignore(f, "dataset", "the evaluation dataset of each reward is eval.reward_dataset_map")
    for key in ("dataset_path", "output_dir", "reward_ckpt_path", "lora_paths"):
        b.ignore(f, key, "path")
    b.fixed(f, "eval_reward", True, "evaluation always scores its rewards")
    b.ignore(f, "preload_reward_models", "a loading-order knob of the reference")
    b.ignore(f, "num_media_images", "media")
    b.same(f, "reward_fn", "eval.rewards", lambda v: {str(k): float(w) for k, w in v.items()})
    b.same(f, "reward_dataset_map", "eval.reward_dataset_map", lambda v: {str(k): str(d) for k, d in v.items()})
    b.ignore(f, "distributed", "inference launch mode")
    b.ignore(f, "strategy", "inference launch mode")


def convert(cold_start: str | Path, rtdmd: str | Path, inference: str | Path | None = None, *,
            name: str, cold_start_gpus: int = 8, rl_gpus: int = 16) -> tuple[dict[str, Any], list[str]]:
    """Reference config files → (params mapping with the fields the reference determines, notes).

    ``cold_start_gpus`` / ``rl_gpus``: the world sizes the reference ran each stage on (its files
    give per-GPU batches; params batches are global)."""
    if cold_start_gpus < 1 or rl_gpus < 1:
        raise ConfigError(f"GPU counts must be >= 1, got cold start {cold_start_gpus}, rl {rl_gpus}")
    files = {"cs": _read(cold_start, "cold-start"), "rl": _read(rtdmd, "rtdmd")}
    sources = {"cs": str(cold_start), "rl": str(rtdmd)}
    if inference is not None:
        files["inf"], sources["inf"] = _read(inference, "inference"), str(inference)
    b = Builder(files, sources)
    b.set("name", name, "cs", "<--name>")
    _model(b)
    _lora(b)
    _sampler_and_dmd(b)
    _ac_dmd(b)
    _cold_start(b, cold_start_gpus)
    _rl(b, rl_gpus)
    _eval(b)
    if inference is not None:
        _inference(b)
    left = b.unmapped()
    if left:
        raise ConfigError(f"{len(left)} reference key(s) cannot be mapped: {'; '.join(left)}")
    return b.out, b.notes


def import_reference_file(cold_start: str, rtdmd: str, inference: str | None, out: str | Path, *,
                          force: bool = False, cold_start_gpus: int = 8, rl_gpus: int = 16) -> tuple[Path, list[str]]:
    """Convert and write ``out`` (a params YAML named after its stem), validated before it is
    published; an existing file is replaced only with ``force`` (atomically)."""
    import os
    import tempfile

    import yaml

    from rtdmd.config.loader import load_params

    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to replace it")
    if out.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"--out {out}: expected a .yaml file name (the params name is its stem)")
    mapping, notes = convert(cold_start, rtdmd, inference, name=out.stem, cold_start_gpus=cold_start_gpus,
                             rl_gpus=rl_gpus)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".yaml", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"# converted by `rtdmd params import-reference` from {cold_start}, {rtdmd}"
                    f"{', ' + str(inference) if inference else ''}\n")
            yaml.safe_dump(mapping, f, sort_keys=False)
        load_params(tmp)  # the written file must load as params (types, ranges, unknown keys)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out, notes
