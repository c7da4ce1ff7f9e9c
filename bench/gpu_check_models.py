"""Models, jobs and precision recipes of the GPU check (``python -m bench.gpu_check``).

Mid-size model: the real FLUX.2-klein 4B transformer block structure — the widths, heads,
head dim, MLP ratio, RoPE axes, latent channels and text width of
``bench.arch.TRANSFORMERS["flux2_4b"]`` (3.88 B parameters at full depth) — at reduced depth:
**1 double-stream block instead of 5, all 20 single-stream blocks**, so the real LoRA target list
of ``params/flux2_4b.yaml`` (which names ``single_transformer_blocks.{0..19}.attn.to_out``)
applies unchanged (≈2.9 B transformer parameters, bf16). 512 px → 32×32 = 1024 image tokens,
512 text tokens (the real ``max_sequence_length``). Departures: random weights; the Qwen3 text
encoder keeps the real hidden width 2560 (so ``joint_attention_dim = 3·2560 = 7680``) and
attention shape but has 3 layers and a smaller MLP (it only produces conditioning); the VAE has
the ``bench.arch.VAES["flux2_4b"]`` widths (factor 8, 32 latent channels). The tokenizer and
scheduler config come from the ``tiny_flux2`` pipeline.

``--dry-run`` uses :data:`MID_DRY` (same block structure and target list, 2 heads × 16, 64 px)
so every code path runs on CPU in seconds.

Recipes (all FSDP2 on every transformer block, ``MixedPrecisionPolicy(param bf16, reduce
fp32)`` = ``distributed.mixed_precision=bf16``):

* ``fp32_masters`` — the project's default: LoRA weights, AdamW state and EMA in fp32 (§12.1).
* ``bf16_masters`` — the reference recipe: LoRA weights and optimizer state in bf16, bf16 EMA
  (``lora.master_dtype=bfloat16``, ``cold_start.ema_dtype=bfloat16``; ``--bf16-masters KEY=VALUE``
  replaces the first override).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAGES = ("cold_start", "rl")


@dataclass(frozen=True)
class MidSize:
    label: str
    heads: int
    head_dim: int
    rope: tuple[int, int, int, int]
    double: int
    single: int
    text_hidden: int
    text_heads: int
    text_kv_heads: int
    text_head_dim: int
    text_mlp: int
    vae_channels: tuple[int, ...]
    vae_groups: int
    resolution: int
    text_len: int
    timestep_channels: int


def _real() -> dict[str, Any]:
    from bench.arch import TRANSFORMERS

    return dict(TRANSFORMERS["flux2_4b"]["cfg"])


MID_GPU = MidSize(label="FLUX.2-klein 4B blocks (24×128 heads, width 3072), 1 double + 20 single, 512 px",
                  heads=24, head_dim=128, rope=(32, 32, 32, 32), double=1, single=20, text_hidden=2560,
                  text_heads=32, text_kv_heads=8, text_head_dim=128, text_mlp=2560,
                  vae_channels=(128, 256, 512, 512), vae_groups=32, resolution=512, text_len=512,
                  timestep_channels=256)
MID_DRY = MidSize(label="dry run: klein block structure at 2×16 heads, 1 double + 20 single, 64 px",
                  heads=2, head_dim=16, rope=(4, 4, 4, 4), double=1, single=20, text_hidden=16,
                  text_heads=2, text_kv_heads=1, text_head_dim=8, text_mlp=32, vae_channels=(8, 8, 8, 8),
                  vae_groups=4, resolution=64, text_len=16, timestep_channels=32)


def transformer_config(m: MidSize) -> dict[str, Any]:
    """The real klein 4B config with the widths/depth of ``m`` (the real one for :data:`MID_GPU`)."""
    cfg = _real()
    cfg.update(num_attention_heads=m.heads, attention_head_dim=m.head_dim, axes_dims_rope=m.rope,
               num_layers=m.double, num_single_layers=m.single, joint_attention_dim=3 * m.text_hidden,
               timestep_guidance_channels=m.timestep_channels)
    return cfg


def build_mid_pipeline(m: MidSize, out: Path, tiny_dir: Path, device: str = "cpu") -> Path:
    """Write the mid-size random-weight pipeline (diffusers layout, bf16) to ``out`` unless present.

    Built into a temporary sibling and renamed, so a half-written model is never loaded.
    """
    import os
    import shutil
    import tempfile

    import torch
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from bench.arch import VAES

    if (out / "model_index.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_dir, subfolder="scheduler")
    vcfg = dict(VAES["flux2_4b"]["cfg"], block_out_channels=m.vae_channels, norm_num_groups=m.vae_groups)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        te = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=512, hidden_size=m.text_hidden, intermediate_size=m.text_mlp, num_hidden_layers=3,
            num_attention_heads=m.text_heads, num_key_value_heads=m.text_kv_heads, head_dim=m.text_head_dim,
            max_position_embeddings=max(512, m.text_len), tie_word_embeddings=True, bos_token_id=None,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).to(torch.bfloat16).eval()
        vae = AutoencoderKLFlux2(**vcfg).to(torch.bfloat16).eval()
        net = Flux2Transformer2DModel(**transformer_config(m)).to(torch.bfloat16).eval()
    pipe = Flux2KleinPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, transformer=net,
                              is_distilled=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def real_lora_targets() -> list[str]:
    from rtdmd.config import load_params

    return list(load_params("flux2_4b").lora.targets)


def bf16_master_overrides(explicit: str | None = None) -> tuple[list[str] | None, str]:
    """Params overrides for the reference's bf16 LoRA masters (``lora.master_dtype``, §12.1)."""
    if explicit:
        return [explicit], f"given: {explicit}"
    return ["lora.master_dtype=bfloat16"], "params key lora.master_dtype"


# ------------------------------------------------------------------------------------------- jobs
def _common(stage: str, steps: int) -> list[str]:
    if stage == "cold_start":
        return [f"cold_start.total_steps={steps}", "cold_start.random_stop=false", "cold_start.fake_update_ratio=1",
                "cold_start.eval_interval=0", "cold_start.log_interval=1000000",
                "cold_start.checkpoint.save_interval=1000000"]
    return [f"rl.epochs={steps}", "rl.eval_interval=0", "rl.log_interval=1000000",
            "rl.checkpoint.save_interval=1000000", "rl.num_batches_per_epoch=1"]


def _batches(stage: str, world: int, per_gpu: int) -> list[str]:
    if stage == "cold_start":
        return [f"cold_start.global_batch_size={per_gpu * world}"]
    return [f"rl.global_sample_batch_size={per_gpu * world}", "rl.num_images_per_prompt=2",
            f"rl.fake_score_batch_size={max(1, per_gpu // 2)}", f"rl.bp.batch_size={max(1, per_gpu // 2)}",
            f"eval.batch_size={per_gpu}", f"eval.num_prompts={per_gpu}"]


def stage_jobs(work: Path, *, dry: bool, world: int, steps: int, bf16_key: str | None = None) -> list[dict]:
    """The instrumented stage runs, in priority order (tiny first, then the mid-size recipes)."""
    mid = MID_DRY if dry else MID_GPU
    tiny_dir, mid_dir = work / "tiny_flux2", work / ("mid_dry" if dry else "mid_klein")
    base = ["distributed.strategy=fsdp", "distributed.fsdp_sharding=full_shard", "distributed.mixed_precision=bf16"]
    tiny = [f"model.pretrained={tiny_dir}", *base, "distributed.gradient_checkpointing=false"]
    targets = "[" + ",".join(real_lora_targets()) + "]"
    mid_ov = [f"model.pretrained={mid_dir}", "model.tiny=false", f"model.resolution={mid.resolution}",
              "model.dtype=bfloat16", f"model.max_sequence_length={mid.text_len}",
              "model.text_encoder_out_layers=[1,2,3]", "lora.rank=32", "lora.alpha=64.0", f"lora.targets={targets}",
              *base, "distributed.gradient_checkpointing=true"]
    bf16, why = bf16_master_overrides(bf16_key)
    recipes = [("fp32_masters", [], None),
               ("bf16_masters", (bf16 or []) + ["cold_start.ema_dtype=bfloat16"], None if bf16 else why)]
    jobs = []
    for stage in STAGES:
        ov = tiny + _common(stage, steps) + _batches(stage, world, 2)
        jobs.append({"name": f"tiny_flux2/{stage}", "model": "tiny_flux2", "recipe": "fp32_masters", "stage": stage,
                     "config": "tiny_flux2", "overrides": ov, "out": str(work / "runs" / "tiny" / stage),
                     "init_from": "tiny_flux2/cold_start" if stage == "rl" else None, "unavailable": None})
    for recipe, extra, unavailable in recipes:
        for stage in STAGES:
            per = 2
            ov = mid_ov + extra + _common(stage, steps) + _batches(stage, world, per)
            jobs.append({"name": f"mid/{recipe}/{stage}", "model": "mid", "recipe": recipe, "stage": stage,
                         "config": "tiny_flux2", "overrides": ov, "out": str(work / "runs" / "mid" / recipe / stage),
                         "init_from": f"mid/{recipe}/cold_start" if stage == "rl" else None,
                         "unavailable": unavailable})
    return jobs


def launch_commands(work: Path, *, world: int, torchrun: list[str]) -> list[tuple[str, list[str], str | None]]:
    """Item 5: the stage commands users run, under torchrun, on ``tiny_flux2``: cold start then RL
    stacked on the cold-start artifact with the real backbones' recipe (FSDP2, bf16 mixed
    precision), and a cold start with tiny_flux2's own params (DDP), which nothing else runs on a GPU.
    Each entry: ``(name, command, name of the entry whose success it needs)``."""
    tiny = work / "tiny_flux2"
    out = work / "launch"
    fsdp = ["distributed.strategy=fsdp", "distributed.mixed_precision=bf16"]
    cs = [*torchrun, "-m", "rtdmd.train", "cold_start", "--config", "tiny_flux2", "--out", str(out / "cold_start"),
          f"model.pretrained={tiny}", "cold_start.total_steps=2", "cold_start.eval_interval=0",
          f"cold_start.global_batch_size={2 * world}", *fsdp]
    rl = [*torchrun, "-m", "rtdmd.train", "rl", "--config", "tiny_flux2", "--out", str(out / "rl"),
          "--init", str(out / "cold_start" / "artifact"), f"model.pretrained={tiny}", "rl.epochs=1",
          "rl.eval_interval=0", "rl.num_batches_per_epoch=1", f"rl.global_sample_batch_size={2 * world}", *fsdp]
    ddp = [*torchrun, "-m", "rtdmd.train", "cold_start", "--config", "tiny_flux2", "--out",
           str(out / "cold_start_ddp"), f"model.pretrained={tiny}", "cold_start.total_steps=1",
           "cold_start.eval_interval=0", f"cold_start.global_batch_size={2 * world}"]
    return [("launch/cold_start", cs, None), ("launch/rl", rl, "launch/cold_start"),
            ("launch/cold_start_ddp", ddp, None)]
