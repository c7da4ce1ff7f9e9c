"""Trust check: the simulated peak against an allocator-level measurement of the same step on CPU.

Both runs execute :func:`rtdmd.plan.simulate.simulate` on the same small model (a tiny or
"sized" FLUX.2-klein built from :func:`flux2_spec`): once under ``FakeTensorMode`` (the
simulation) and once for real in fp32 on the CPU, where ``torch.profiler`` with
``profile_memory=True`` records every allocation and free of the CPU allocator; the running sum
of those events gives the measured peak (not RSS, which the Python heap and freed-but-cached
pages blur).
"""
from __future__ import annotations

from typing import Any

FLUX2_VALIDATION = {
    # name: transformer size (heads × head_dim = width, double / single blocks), resolution, batch
    "tiny": dict(heads=2, head_dim=16, double=1, single=1, resolution=32, batch=2),
    "sized": dict(heads=4, head_dim=32, double=2, single=4, resolution=64, batch=2),
}


def flux2_spec(heads: int, head_dim: int, double: int, single: int) -> dict:
    """Components of a small FLUX.2-klein (Qwen3 text encoder with 3 layers, 1-stage VAE)."""
    qwen = dict(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True)
    rope = head_dim // 4
    transformer = dict(patch_size=1, in_channels=16, num_layers=double, num_single_layers=single,
                       attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=48,
                       timestep_guidance_channels=32, axes_dims_rope=(rope,) * 4, guidance_embeds=False)
    vae = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
               latent_channels=4, norm_num_groups=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
               patch_size=(2, 2), mid_block_add_attention=True)
    sched = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
    return {"transformer": {"cls": "Flux2Transformer2DModel", "cfg": transformer},
            "text_encoders": [{"cls": "Qwen3Model", "cfg": qwen}],
            "vae": {"cls": "AutoencoderKLFlux2", "cfg": vae}, "scheduler": sched}


def validation_params(resolution: int, batch: int, extra: list[str] = ()):
    from rtdmd.config import load_params
    from rtdmd.plan.simulate import stage_overrides

    return load_params("tiny_flux2", stage_overrides("cold_start") + [
        "distributed.strategy=none", f"model.resolution={resolution}", f"cold_start.global_batch_size={batch}",
        *extra])


def measured_peak(fn) -> tuple[int, Any]:
    """Peak bytes of the CPU allocator while ``fn()`` runs (torch.profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    from torch._C._profiler import _EventType

    allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:  # one allocator call: +bytes (alloc) or -bytes (free)
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(allocs):
        live += size
        peak = max(peak, live)
    return peak, result


# further validation cases on the tiny model: DDP on a fake world of 2, and one RL epoch
CASES = {
    "tiny": dict(model="tiny"), "sized": dict(model="sized"),
    "tiny ddp×2": dict(model="tiny", world=2, extra=["distributed.strategy=ddp"]),
    # FSDP2 on a fake world of 2, transformers built on the meta device and streamed in shard by
    # shard (distributed.fsdp_load=meta) from simulated safetensors files (rtdmd.plan.models)
    "tiny fsdp×2": dict(model="tiny", world=2, extra=["distributed.strategy=fsdp", "distributed.fsdp_load=meta"]),
    "tiny rl": dict(model="tiny", stage="rl", extra=[
        "rl.global_sample_batch_size=4", "rl.num_images_per_prompt=2", "rl.num_batches_per_epoch=2",
        "rl.bp.batch_size=1", "rl.reward_weights={clipscore: 1.0, geneval: 1.0}"]),
}


def case_params(model: str, stage: str = "cold_start", world: int = 1, extra: list[str] = ()):
    from rtdmd.config import load_params
    from rtdmd.plan.simulate import stage_overrides

    v = FLUX2_VALIDATION[model]
    if stage == "cold_start":
        return validation_params(v["resolution"], v["batch"] * world, ["distributed.strategy=none", *extra])
    return load_params("tiny_flux2", stage_overrides(stage) + [
        "distributed.strategy=none", f"model.resolution={v['resolution']}", *extra])


def compare(name: str, extra: list[str] = ()) -> dict[str, Any]:
    """Simulated vs measured peak (and per phase: the real run's tracker) for one validation case."""
    from rtdmd.plan.simulate import simulate

    case = CASES[name]
    v = FLUX2_VALIDATION[case["model"]]
    stage, world = case.get("stage", "cold_start"), case.get("world", 1)
    spec = flux2_spec(v["heads"], v["head_dim"], v["double"], v["single"])
    rewards = tiny_reward_specs() if stage == "rl" else None

    def run(fake: bool):
        params = case_params(case["model"], stage, world, [*case.get("extra", []), *extra])
        return simulate(params, stage, gpus_per_node=world, spec=spec, fake=fake, reward_specs=rewards)

    sim = run(True)
    peak, real = measured_peak(lambda: run(False))
    return {"model": name, **{k: v[k] for k in ("heads", "head_dim", "double", "single", "resolution")},
            "batch": sim["per_gpu_batch"], "stage": stage, "world": world,
            "simulated_peak": sim["peak_bytes"], "measured_peak": peak,
            "rel_error": (sim["peak_bytes"] - peak) / peak, "simulated_by_phase": sim["peak_by_phase"],
            "real_tracker_by_phase": real["peak_by_phase"], "flops_sim": sim["flops_per_step_per_gpu"],
            "flops_real": real["flops_per_step_per_gpu"]}


def tiny_reward_specs() -> dict:
    """Small stand-ins of :data:`rtdmd.plan.facts.REWARD_MODELS` (same classes and code path; for tests)."""
    clip = dict(text_config=dict(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77),
                vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=32, patch_size=8), projection_dim=8)
    clip_spec = {"cls": "CLIPModel", "cfg": clip, "image_size": 32, "differentiable": True}
    return {"clipscore": clip_spec, "pickscore": clip_spec, "hpsv2": clip_spec,
            "geneval": {"cls": "Mask2FormerForUniversalSegmentation", "image_size": 64, "differentiable": False,
                        "cfg": dict(backbone_config=dict(model_type="swin", embed_dim=32, depths=[1, 1, 1, 1],
                                                         num_heads=[1, 1, 1, 1], window_size=2, image_size=64,
                                                         out_features=["stage1", "stage2", "stage3", "stage4"]),
                                    num_labels=4, hidden_dim=32, num_queries=4, encoder_layers=1, decoder_layers=2,
                                    encoder_feedforward_dim=32, dim_feedforward=32, mask_feature_size=32,
                                    feature_size=32, num_attention_heads=2),
                        "colour": {"cls": "CLIPModel", "cfg": clip, "crops": 2}}}
