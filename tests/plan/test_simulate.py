"""The simulation runs the project's own trainer on fake tensors and agrees with a real run."""
import pytest

from rtdmd.plan.simulate import simulate
from rtdmd.plan.validate import FLUX2_VALIDATION, compare, flux2_spec, validation_params


def _tiny(extra=(), batch=2):
    v = FLUX2_VALIDATION["tiny"]
    return validation_params(v["resolution"], batch, list(extra)), flux2_spec(v["heads"], v["head_dim"], v["double"],
                                                                               v["single"])


@pytest.mark.slow
def test_fsdp_on_a_fake_world_shards_the_three_transformers():
    """World 4 under FSDP2 (fake process group) keeps 1/4 of the (shared) transformer per rank
    (and of the LoRA adapters and the generator's EMA shadow, which live on the sharded modules)."""
    import torch

    from rtdmd.lora import inject_lora, lora_parameters
    from rtdmd.plan.models import build_module

    params, spec = _tiny(["distributed.strategy=fsdp"])
    one = simulate(params, "cold_start", spec=spec)
    params4, _ = _tiny(["distributed.strategy=fsdp"], batch=8)
    four = simulate(params4, "cold_start", nodes=1, gpus_per_node=4, spec=spec)
    net = build_module(spec["transformer"], torch.float32)
    frozen = sum(p.numel() for p in net.parameters()) * 4  # fp32 (tiny params)
    lc = params.lora
    inject_lora(net, list(lc.targets), lc.rank, lc.alpha)
    lora = sum(p.numel() for p in lora_parameters(net).values()) * 4
    saved = one["resident_after_load"] - four["resident_after_load"]
    # the base (one shared by teacher, generator and fake score with distributed.share_base, the
    # default; three copies without) + generator and fake-score adapters + EMA shadow
    bases = 1 if params.distributed.share_base else 3
    assert saved == pytest.approx((bases * frozen + 3 * lora) * 3 / 4, rel=0.02)
    assert four["per_gpu_batch"] == one["per_gpu_batch"] == 2
    assert set(four["peak_by_phase"]) >= {"load", "rollout", "fake_update", "generator_update"}


@pytest.mark.slow
def test_simulated_peak_matches_the_allocator_within_10_percent():
    r = compare("tiny")
    assert abs(r["rel_error"]) < 0.10, r
    assert r["flops_sim"] == r["flops_real"] > 0
