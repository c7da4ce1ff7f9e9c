"""Typed params: one dataclass tree per backbone file ``params/<backbone>.yaml``.

Defaults here are neutral; every reference setting (spec §10) is written out in the backbone's
YAML so the file is the single source of truth for that backbone. Batch sizes are *global*;
:meth:`Params.per_rank` derives per-rank sizes and fails before any model loads when the world
size does not divide them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

Family = Literal["flux2_klein", "sd3", "flux1", "toy2d"]
DType = Literal["float32", "bfloat16", "float16"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class ModelCfg:
    family: Family
    pretrained: str  # hub id or local dir of the teacher/base pipeline
    revision: Optional[str] = None
    generator_init: Optional[str] = None  # e.g. the distilled FLUX.2-klein checkpoint
    tiny: bool = False  # build random-weight tiny pipelines into `pretrained` when missing
    tiny_config: str = ""  # name of the tiny builder config (tiny_* backbones)
    resolution: int = 512
    dtype: DType = "bfloat16"
    max_sequence_length: Optional[int] = None
    text_encoder_out_layers: Optional[list[int]] = None
    patch_embed_linear: bool = False  # SD3-M FSDP work-around (§8.1)
    # §12.6: the reference feeds FLUX transformers t = 1000σ cast to bf16 before /1000
    quantize_timestep: bool = False
    # frozen text encoders: "device" = on the training device; "cpu_offload" = weights kept in host
    # memory and streamed to the device one submodule at a time during encoding (accelerate)
    encoders_device: Literal["device", "cpu_offload"] = "device"

    def validate(self):
        _check(not self.patch_embed_linear,
               "model.patch_embed_linear: true (the reference's FSDP1 patch-embed work-around, §8.1) is not "
               "supported: FSDP2 shards the patch-embed convolution as it is; set it to false")
        _check(not self.quantize_timestep or self.family in ("flux2_klein", "flux1"),
               f"model.quantize_timestep applies to the FLUX families only, not {self.family!r}")
        _check(self.resolution > 0 and self.resolution % 16 == 0 or self.family == "toy2d",
               f"model.resolution must be a positive multiple of 16, got {self.resolution}")
        _check(not self.tiny or bool(self.tiny_config), "model.tiny_config is required when model.tiny is true")
        _check(self.encoders_device == "device" or self.family != "toy2d",
               "model.encoders_device: toy2d has no text encoders; use device")


@dataclass
class LoraCfg:
    rank: int = 32
    alpha: float = 64.0
    targets: list[str] = field(default_factory=list)
    init: Literal["gaussian", "kaiming"] = "gaussian"
    # §12.2: the reference re-initialises A ~ N(0, 1) after merging a LoRA into the base;
    # "peft" keeps the regular init (A ~ N(0, 1/r^2)). Only matters for reproducing stage 2.
    reinit_after_merge: Literal["peft", "reference"] = "peft"
    # §12.1: dtype of the trainable LoRA tensors, hence of their AdamW state and the stage-2 EMA
    # shadow. The reference keeps them in bf16 (updates of ~lr mostly round away: A barely moves).
    master_dtype: Literal["float32", "bfloat16"] = "float32"

    def validate(self):
        _check(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        _check(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        _check(len(self.targets) > 0, "lora.targets must list at least one module name")


@dataclass
class SamplerCfg:
    step_list: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])
    eta: float = 0.9
    guidance: float = 1.0  # generator guidance (no CFG)
    teacher_steps: int = 50
    teacher_guidance: float = 1.0
    log_prob: Literal["simplified", "exact"] = "simplified"

    def validate(self):
        _check(0.0 <= self.eta <= 1.0, f"sampler.eta must be in [0, 1], got {self.eta}")
        _check(len(self.step_list) > 0, "sampler.step_list must not be empty")
        _check(all(0 < s <= 1000 for s in self.step_list), f"sampler.step_list entries must be in (0, 1000], got {self.step_list}")
        _check(all(a > b for a, b in zip(self.step_list, self.step_list[1:])),
               f"sampler.step_list must be strictly descending, got {self.step_list}")
        _check(self.teacher_steps >= 1, f"sampler.teacher_steps must be >= 1, got {self.teacher_steps}")


@dataclass
class OptimCfg:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    # LR warm-up factor min(1, k/warmup) as the reference ("reference": the first step at lr 0)
    # or min(1, (k+1)/warmup) ("shifted"); identical when warmup_steps is 0
    warmup_formula: Literal["reference", "shifted"] = "reference"

    def validate(self):
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(all(0 <= b < 1 for b in self.betas), f"betas must be in [0, 1), got {self.betas}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")


@dataclass
class DmdCfg:
    min_step: int = 20
    max_step: int = 980
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    gradient_normalization: bool = True

    def validate(self):
        _check(0 <= self.min_step < self.max_step <= 1000,
               f"dmd.min_step must be < dmd.max_step within [0, 1000], got {self.min_step} >= {self.max_step}"
               if self.min_step >= self.max_step else f"dmd.min_step/max_step out of [0, 1000]: {self.min_step}, {self.max_step}")


@dataclass
class AcDmdCfg:
    enabled: bool = True  # false = plain DMD (§4.2)
    start_mode: Literal["next_sigma", "fixed_boundary"] = "next_sigma"
    boundary_index: int = 1
    offset: float = 10.0
    end_timestep: float = 1000.0
    min_renoise_step: float = 20.0
    max_renoise_step: float = 980.0
    move_scale_out: bool = True
    weight_clamp: tuple[float, float] = (0.0, 10.0)

    def validate(self):
        _check(self.min_renoise_step < self.max_renoise_step,
               f"ac_dmd.min_renoise_step must be < max_renoise_step, got {self.min_renoise_step} >= {self.max_renoise_step}")
        _check(self.weight_clamp[0] <= self.weight_clamp[1], f"ac_dmd.weight_clamp must be [lo, hi], got {self.weight_clamp}")


@dataclass
class ConsistencyCfg:
    enabled: bool = True
    weight: float = 0.01
    eps_timestep: float = 200.0
    num_moves: int = 1
    two_sample: bool = True
    stopgrad_transitions: bool = True

    def validate(self):
        _check(self.weight >= 0, f"consistency.weight must be >= 0, got {self.weight}")
        _check(self.num_moves >= 1, f"consistency.num_moves must be >= 1, got {self.num_moves}")


@dataclass
class CheckpointCfg:
    save_interval: int = 5000
    keep_last: int = 3
    dir: str = ""  # local dir or s3:// URI; empty = <output>/checkpoints

    def validate(self):
        _check(self.save_interval >= 1, f"checkpoint.save_interval must be >= 1, got {self.save_interval}")
        _check(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass
class StageDistributedCfg:
    """Per-stage overrides of ``distributed`` (the reference runs e.g. SD3.5-M stage 1 on FSDP and
    stage 2 on DDP); ``null`` inherits the top-level value."""

    strategy: Optional[Literal["none", "ddp", "fsdp"]] = None
    fsdp_sharding: Optional[Literal["full_shard", "hybrid_shard", "shard_grad_op"]] = None


@dataclass
class ColdStartCfg:
    prompts: str = "data/prompts/pickscore"
    teacher_guidance: tuple[float, float] = (1.0, 1.0)  # CFG range [w_min, w_max]
    random_stop: bool = True
    fake_update_ratio: int = 10
    global_batch_size: int = 72
    total_steps: int = 100000
    eval_interval: int = 1000
    log_interval: int = 10
    seed: int = 42
    generator: OptimCfg = field(default_factory=OptimCfg)
    fake_score: OptimCfg = field(default_factory=OptimCfg)
    ema_decay: float = 0.99
    ema_every: int = 1
    ema_dtype: Literal["float32", "bfloat16"] = "float32"  # §12.3
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    # steps at which a complete LoRA artifact (EMA generator + fake score) is published besides
    # the final one, under <out>/milestones/step-<N> (the reference seeds stage 2 from step 15000)
    milestones: list[int] = field(default_factory=list)
    distributed: StageDistributedCfg = field(default_factory=StageDistributedCfg)

    def validate(self):
        _check(all(0 < m <= self.total_steps for m in self.milestones),
               f"cold_start.milestones must lie in [1, cold_start.total_steps={self.total_steps}], got {self.milestones}")
        _check(self.fake_update_ratio >= 1, f"cold_start.fake_update_ratio must be >= 1, got {self.fake_update_ratio}")
        _check(self.teacher_guidance[0] <= self.teacher_guidance[1],
               f"cold_start.teacher_guidance must be [w_min, w_max], got {self.teacher_guidance}")
        _check(0 <= self.ema_decay < 1, f"cold_start.ema_decay must be in [0, 1), got {self.ema_decay}")
        _check(self.total_steps >= 1 and self.global_batch_size >= 1, "cold_start.total_steps and global_batch_size must be >= 1")


@dataclass
class StepSelectionCfg:
    enabled: bool = True
    range_start: int = 0
    range_end: int = 2
    num_steps: int = 2

    def validate(self):
        _check(0 <= self.range_start <= self.range_end, f"step_selection range must satisfy 0 <= start <= end, got [{self.range_start}, {self.range_end}]")
        _check(1 <= self.num_steps <= self.range_end - self.range_start + 1,
               f"step_selection.num_steps must be in [1, {self.range_end - self.range_start + 1}], got {self.num_steps}")


@dataclass
class BpCfg:
    enabled: bool = True
    margin: float = 3.0
    grad_scale: float = 1e-4
    deterministic_only: bool = True
    batch_size: int = 0  # decode/score chunk, 0 = whole sub-batch
    # BP rewards {name: weight}; empty = the differentiable subset of rl.reward_weights (reference
    # behaviour). Every name given here must be differentiable (checked by the RL trainer).
    rewards: dict[str, float] = field(default_factory=dict)


@dataclass
class LastStepCfg:
    loss: Literal["ac_dmd", "dmd", "none"] = "ac_dmd"
    weight: float = 0.001
    train_steps: list[int] = field(default_factory=lambda: [-1])
    consistency: bool = True


@dataclass
class RlCfg:
    prompts: str = "data/prompts/geneval"
    num_images_per_prompt: int = 24
    global_sample_batch_size: int = 96  # images per sampling iteration over all ranks
    num_batches_per_epoch: int = 16
    epochs: int = 1000
    teacher_guidance: tuple[float, float] = (1.0, 1.0)
    generator: OptimCfg = field(default_factory=lambda: OptimCfg(lr=3e-6, weight_decay=1e-4))
    fake_score: OptimCfg = field(default_factory=OptimCfg)
    fake_score_batch_size: int = 2
    clip_range_low: float = 1e-5
    clip_range_high: float = 1e-5
    kl_beta: float = 0.0
    adv_clip_max: float = 5.0
    global_std: bool = True
    weight_advantages: bool = True
    timestep_fraction: float = 1.0
    policy_gradient: bool = True  # false = no SubGRPO/PPO term (the "BP only" ablation)
    step_selection: StepSelectionCfg = field(default_factory=StepSelectionCfg)
    ema_decay: float = 0.9
    ema_interval: int = 8
    # §12.4: "sub_batch" reproduces the reference (EMA called after each of the NB sub-batches,
    # i.e. NB identical updates every ema_interval-th optimizer step: a delayed snapshot);
    # "optimizer_step" updates once per optimizer step (a smooth average)
    ema_cadence: Literal["sub_batch", "optimizer_step"] = "sub_batch"
    # prompts of the periodic evaluation: the test split of rl.prompts (the reference) or the
    # training prompts themselves
    eval_split: Literal["test", "train"] = "test"
    reward_weights: dict[str, float] = field(default_factory=dict)
    last_step: LastStepCfg = field(default_factory=LastStepCfg)
    bp: BpCfg = field(default_factory=BpCfg)
    eval_interval: int = 50
    log_interval: int = 1
    seed: int = 42
    checkpoint: CheckpointCfg = field(default_factory=lambda: CheckpointCfg(save_interval=100))
    # the cold-start milestone RL starts from (its artifact's manifest must say this step);
    # null accepts any cold-start artifact
    init_milestone: Optional[int] = None
    distributed: StageDistributedCfg = field(default_factory=StageDistributedCfg)

    def validate(self):
        _check(self.init_milestone is None or self.init_milestone >= 1,
               f"rl.init_milestone must be >= 1 or null, got {self.init_milestone}")
        k = self.num_images_per_prompt
        _check(k >= 1, f"rl.num_images_per_prompt must be >= 1, got {k}")
        _check(self.global_sample_batch_size % k == 0,
               f"rl.num_images_per_prompt (K={k}) must divide rl.global_sample_batch_size ({self.global_sample_batch_size})")
        _check(self.clip_range_low >= 0 and self.clip_range_high >= 0, "rl.clip_range_low/high must be >= 0")
        _check(len(self.reward_weights) > 0, "rl.reward_weights must name at least one reward")


@dataclass
class CompileCfg:
    """Regional compilation of the repeated transformer blocks (``torch.compile`` per block).

    ``enabled``: ``never``; ``cuda`` = only when the run's device is a GPU; ``always`` (also CPU).
    ``dynamic``: ``torch.compile(dynamic=...)`` — ``false`` specialises on each stage's (fixed)
    batch shapes, ``true`` compiles shape-generic kernels once. ``backend``: ``inductor`` (kernels)
    or ``aot_eager`` (graph capture only; for debugging a compile problem).
    """
    enabled: Literal["never", "cuda", "always"] = "never"
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    dynamic: bool = False
    fullgraph: bool = False
    backend: Literal["inductor", "aot_eager"] = "inductor"


@dataclass
class DistributedCfg:
    strategy: Literal["none", "ddp", "fsdp"] = "ddp"
    fsdp_sharding: Literal["full_shard", "hybrid_shard", "shard_grad_op"] = "full_shard"
    mixed_precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    gradient_checkpointing: bool = False
    offload_frozen: bool = False
    # one frozen base for the roles whose base weights are identical, a LoRA adapter per role
    # (rtdmd.train.shared_base); false = the reference's separate full copy per role
    share_base: bool = True
    # under FSDP: "meta" = build on the meta device, shard, stream the weights in shard by shard
    # (rtdmd.train.sharded_load); "whole" = load each transformer whole, then shard
    fsdp_load: Literal["meta", "whole"] = "meta"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    compile: CompileCfg = field(default_factory=CompileCfg)


@dataclass
class EvalCfg:
    rewards: dict[str, float] = field(default_factory=dict)
    reward_dataset_map: dict[str, str] = field(default_factory=dict)
    datasets_root: str = "data/prompts"
    num_prompts: int = 64
    seed: int = 42
    batch_size: int = 16
    teacher_steps: int = 50


@dataclass
class ResourceCfg:
    nodes: int = 1
    gpus_per_node: int = 8
    cpu: int = 32
    memory_gb: int = 512
    shared_memory_gb: int = 64
    retries: int = 2

    def validate(self):
        _check(self.nodes >= 1 and self.gpus_per_node >= 0, f"resources need nodes >= 1, gpus >= 0, got {self.nodes}, {self.gpus_per_node}")


@dataclass
class ComputeCfg:
    image: str = "ghcr.io/rtdmd/rtdmd:latest"
    cold_start: ResourceCfg = field(default_factory=ResourceCfg)
    rl: ResourceCfg = field(default_factory=ResourceCfg)
    eval: ResourceCfg = field(default_factory=lambda: ResourceCfg(gpus_per_node=8))
    local_nproc: int = 2  # CPU processes (gloo) when the local machine has no GPU


# metric keys of an evaluation run besides the reward names (rtdmd.eval.report.mlflow_runs)
REGISTRY_AGGREGATE_KEYS = ("mean", "train_weighted_sum", "held_out_weighted_sum")


@dataclass
class RegistryCfg:
    """Model registry and promotion gates (``rtdmd.registry``; ``rtdmd promote``).

    Scores are the evaluation matrix's per-reward means (higher is better). A candidate becomes
    ``champion`` only when every gate passes (or with ``--force --reason``):

    * ``required_rewards``: each must have a score in the candidate's evaluation;
    * ``min_delta_vs_champion`` / ``min_delta_vs_cold_start``: ``{reward: d}`` requires
      ``candidate - reference >= d`` against the current champion / the candidate's own cold-start
      model (a negative ``d`` tolerates a drop of at most ``|d|``);
    * ``held_out_tolerance``: every held-out reward (evaluated but not in ``rl.reward_weights``)
      may drop at most this much against the champion and the cold-start model
      (``held_out_tolerances: {reward: t}`` overrides it per reward, since reward scales differ;
      ``check_held_out: false`` disables the check).
    """

    model_name: str = ""  # registered model name; empty = "rtdmd-<params name>"
    required_rewards: list[str] = field(default_factory=list)
    min_delta_vs_champion: dict[str, float] = field(default_factory=dict)
    min_delta_vs_cold_start: dict[str, float] = field(default_factory=dict)
    check_held_out: bool = True
    held_out_tolerance: float = 0.0
    held_out_tolerances: dict[str, float] = field(default_factory=dict)  # per-reward overrides (reward scales differ)
    lock_timeout_s: float = 120.0  # how long a promotion waits for a concurrent one
    lock_ttl_s: float = 900.0  # a lock older than this is considered abandoned and broken

    def validate(self):
        import math
        import re

        name_re = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
        _check(self.model_name == "" or bool(name_re.match(self.model_name)),
               f"registry.model_name {self.model_name!r} must match {name_re.pattern}")
        seen = set()
        for r in self.required_rewards:
            _check(bool(r) and bool(name_re.match(r)), f"registry.required_rewards: {r!r} is not a reward name")
            _check(r not in seen, f"registry.required_rewards lists {r!r} twice")
            seen.add(r)
        for key in ("min_delta_vs_champion", "min_delta_vs_cold_start"):
            for r, d in getattr(self, key).items():
                _check(bool(r) and bool(name_re.match(str(r))), f"registry.{key}: {r!r} is not a reward name")
                _check(math.isfinite(d), f"registry.{key}.{r} must be a finite number, got {d}")
        _check(math.isfinite(self.held_out_tolerance) and self.held_out_tolerance >= 0,
               f"registry.held_out_tolerance must be a finite number >= 0, got {self.held_out_tolerance}")
        for r, t in self.held_out_tolerances.items():
            _check(bool(r) and bool(name_re.match(str(r))), f"registry.held_out_tolerances: {r!r} is not a reward name")
            _check(math.isfinite(t) and t >= 0, f"registry.held_out_tolerances.{r} must be a finite number >= 0, got {t}")
        _check(self.lock_timeout_s > 0, f"registry.lock_timeout_s must be > 0, got {self.lock_timeout_s}")
        _check(self.lock_ttl_s > 0, f"registry.lock_ttl_s must be > 0, got {self.lock_ttl_s}")

    def gate_rewards(self) -> list[str]:
        """Every reward a gate refers to (required or with a minimum delta)."""
        out: list[str] = []
        for r in [*self.required_rewards, *self.min_delta_vs_champion, *self.min_delta_vs_cold_start,
                  *self.held_out_tolerances]:
            if r not in out:
                out.append(r)
        return out


@dataclass
class Params:
    name: str
    model: ModelCfg
    lora: LoraCfg
    sampler: SamplerCfg = field(default_factory=SamplerCfg)
    dmd: DmdCfg = field(default_factory=DmdCfg)
    ac_dmd: AcDmdCfg = field(default_factory=AcDmdCfg)
    consistency: ConsistencyCfg = field(default_factory=ConsistencyCfg)
    cold_start: ColdStartCfg = field(default_factory=ColdStartCfg)
    rl: RlCfg = field(default_factory=lambda: RlCfg(reward_weights={"pickscore": 1.0}))
    distributed: DistributedCfg = field(default_factory=DistributedCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    compute: ComputeCfg = field(default_factory=ComputeCfg)
    registry: RegistryCfg = field(default_factory=RegistryCfg)

    def validate(self):
        m = self.rl.init_milestone
        _check(m is None or m in self.cold_start.milestones,
               f"rl.init_milestone={m} is not one of cold_start.milestones {self.cold_start.milestones}: the cold "
               f"start must publish the state RL starts from")
        _check(self.dmd.min_step < self.dmd.max_step, f"dmd.min_step ({self.dmd.min_step}) must be < dmd.max_step ({self.dmd.max_step})")
        if self.eval.rewards:  # gates may only name evaluated rewards (or the matrix aggregates)
            known = set(self.eval.rewards) | set(REGISTRY_AGGREGATE_KEYS)
            unknown = [r for r in self.registry.gate_rewards() if r not in known]
            _check(not unknown, f"registry gates name reward(s) {unknown} that are not evaluated; "
                                f"eval.rewards has {sorted(self.eval.rewards)} (plus {', '.join(REGISTRY_AGGREGATE_KEYS)})")

    def for_stage(self, stage: str) -> "Params":
        """A copy whose ``distributed`` section carries the stage's overrides (``<stage>.distributed``)."""
        import dataclasses

        section = {"cold_start": self.cold_start, "rl": self.rl}.get(stage)
        over = section.distributed if section is not None else None
        if over is None or (over.strategy is None and over.fsdp_sharding is None):
            return self
        dist = dataclasses.replace(self.distributed, **{k: v for k, v in (("strategy", over.strategy),
                                                                          ("fsdp_sharding", over.fsdp_sharding)) if v is not None})
        return dataclasses.replace(self, distributed=dist)

    def per_rank(self, global_size: int, world_size: int, key: str) -> int:
        """Per-rank share of a global batch; raises when ``world_size`` does not divide it."""
        if world_size < 1:
            raise ValueError(f"world size must be >= 1, got {world_size}")
        if global_size % world_size:
            raise ValueError(
                f"{key}={global_size} is not divisible by the world size {world_size}; "
                f"choose a global batch that is a multiple of the number of processes"
            )
        return global_size // world_size

    def check_world_size(self, world_size: int, stage: str) -> None:
        """Validate the stage's global batches against ``world_size`` (call before loading models)."""
        if stage == "cold_start":
            self.per_rank(self.cold_start.global_batch_size, world_size, "cold_start.global_batch_size")
        elif stage == "rl":
            per_rank = self.per_rank(self.rl.global_sample_batch_size, world_size, "rl.global_sample_batch_size")
            total = per_rank * world_size * self.rl.num_batches_per_epoch
            if total % self.rl.num_images_per_prompt:
                raise ValueError(
                    f"rl.num_batches_per_epoch x rl.global_sample_batch_size ({total}) must be divisible by "
                    f"rl.num_images_per_prompt ({self.rl.num_images_per_prompt})"
                )
        elif stage != "eval":
            raise ValueError(f"unknown stage {stage!r}; expected cold_start, rl or eval")
