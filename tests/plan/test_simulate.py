"""The simulation runs the project's own trainer on fake tensors and agrees with a real run."""
import pytest

from rtdmd.plan.simulate import simulate
from rtdmd.plan.validate import FLUX2_VALIDATION, flux2_spec, validation_params


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
@pytest.mark.parametrize("case", ["tiny", "tiny fsdp×2"])
def test_simulated_peak_matches_the_allocator_within_10_percent(case):
    """In a fresh process, as ``python -m bench.plan_validation`` runs it: the allocator-level
    measurement also sees the process's first-use allocations, which earlier tests change (in the
    full suite's process the FSDP case once measured 38 % off; the cause is not pinned down)."""
    import json
    import subprocess
    import sys

    code = ("import json, sys; from rtdmd.plan.validate import compare; "
            "print(json.dumps(compare(sys.argv[1]), default=float))")
    run = subprocess.run([sys.executable, "-c", code, case], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert abs(r["rel_error"]) < 0.10, r
    assert r["flops_sim"] == r["flops_real"] > 0
    # the tracker's per-phase peaks of the real run are those of the simulation (load included)
    for ph, b in r["real_tracker_by_phase"].items():
        assert r["simulated_by_phase"][ph] == pytest.approx(b, rel=0.01), ph


@pytest.mark.slow
def test_meta_load_streams_one_parameter_at_a_time_where_whole_load_holds_the_models():
    """fsdp_load=meta in the simulation takes the real path (meta model, shard, stream from the
    simulated safetensors file): above what stays resident, the load holds at most one full
    parameter and its shard; loading whole holds the unsharded transformers before sharding."""
    import torch

    from rtdmd.plan.models import build_module

    _, spec = _tiny()
    net = build_module(spec["transformer"], torch.float32)
    whole_bytes = sum(p.numel() for p in net.parameters()) * 4
    largest = max(p.numel() for p in net.parameters()) * 4
    extra = {}
    for load in ("whole", "meta"):
        params, _ = _tiny(["distributed.strategy=fsdp", f"distributed.fsdp_load={load}",
                           "distributed.share_base=false"], batch=4)
        r = simulate(params, "cold_start", gpus_per_node=2, spec=spec, flops=False)
        extra[load] = r["load_peak_at_setup_end"] - r["resident_after_load"]
    assert extra["whole"] >= whole_bytes / 2  # at least the other rank's half of one transformer
    assert extra["meta"] <= 1.5 * largest + 32 * 1024  # one full tensor, its shard, small buffers


@pytest.mark.slow
def test_ddp_on_a_fake_world_adds_one_gradient_bucket_copy_of_the_lora():
    """DDP wraps generator and fake score on the fake process group; its reducer's buckets hold one
    copy of each wrapped role's trainable (LoRA) parameters, which a single process does not have."""
    import torch

    from rtdmd.lora import inject_lora, lora_parameters
    from rtdmd.plan.models import build_module

    params, spec = _tiny(["distributed.strategy=none"])
    one = simulate(params, "cold_start", spec=spec, flops=False)
    params2, _ = _tiny(["distributed.strategy=ddp"], batch=4)
    two = simulate(params2, "cold_start", gpus_per_node=2, spec=spec, flops=False)
    net = build_module(spec["transformer"], torch.float32)
    lc = params.lora
    inject_lora(net, list(lc.targets), lc.rank, lc.alpha)
    lora = sum(p.numel() for p in lora_parameters(net).values()) * 4
    assert two["strategy"] == "ddp" and two["per_gpu_batch"] == one["per_gpu_batch"] == 2
    extra = two["resident_after_load"] - one["resident_after_load"] - 2 * lora
    assert 0 <= extra < 1024  # + the reducer's small bookkeeping tensors
    assert two["flops_counted"] is False and set(two["flops_by_phase"].values()) == {0}


@pytest.mark.slow
def test_rl_epoch_runs_with_reward_stand_ins_and_reports_the_bp_phase():
    """One RL epoch (2 sampling iterations, fake update, generator update with BP decode chunks)."""
    from rtdmd.config import load_params
    from rtdmd.plan.simulate import stage_overrides
    from rtdmd.plan.validate import tiny_reward_specs

    v = FLUX2_VALIDATION["tiny"]
    spec = flux2_spec(v["heads"], v["head_dim"], v["double"], v["single"])
    params = load_params("tiny_flux2", stage_overrides("rl") + [
        "distributed.strategy=none", f"model.resolution={v['resolution']}", "rl.global_sample_batch_size=4",
        "rl.num_images_per_prompt=2", "rl.num_batches_per_epoch=2", "rl.bp.batch_size=1",
        "rl.reward_weights={clipscore: 1.0, geneval: 1.0}"])
    r = simulate(params, "rl", spec=spec, reward_specs=tiny_reward_specs())
    assert {"load", "rollout", "fake_update", "generator_update", "bp"} <= set(r["peak_by_phase"])
    assert r["flops_by_phase"]["bp"] > 0 and r["flops_by_phase"]["rollout"] > 0
    # the BP phase holds a decode + reward graph on top of what is resident
    assert r["peak_by_phase"]["bp"] > r["resident_after_load"]
    assert r["per_gpu_batch"] == 4 and r["stage"] == "rl"


@pytest.mark.slow
def test_a_chunk_limit_gives_the_full_simulations_peaks_with_fewer_chunks():
    """RL's chunked loops simulated by their first two chunks (+ a smaller last one) give the same
    per-phase peaks as all of them: 8 fake-score chunks and 4 BP chunks per sub-batch here."""
    from unittest import mock

    from rtdmd.config import load_params
    from rtdmd.plan.simulate import stage_overrides
    from rtdmd.plan.validate import tiny_reward_specs
    from rtdmd.train import rl_terms

    v = FLUX2_VALIDATION["tiny"]
    spec = flux2_spec(v["heads"], v["head_dim"], v["double"], v["single"])
    params = load_params("tiny_flux2", stage_overrides("rl") + [
        "distributed.strategy=none", f"model.resolution={v['resolution']}", "rl.global_sample_batch_size=4",
        "rl.num_images_per_prompt=2", "rl.num_batches_per_epoch=2", "rl.bp.batch_size=1",
        "rl.fake_score_batch_size=1", "rl.reward_weights={clipscore: 1.0, geneval: 1.0}"])
    seen: list[int] = []
    real = rl_terms.chunk_slices

    def counted(n, size):
        out = real(n, size)
        seen.append(len(out))
        return out

    with mock.patch.object(rl_terms, "chunk_slices", counted):
        full = simulate(params, "rl", spec=spec, reward_specs=tiny_reward_specs(), flops=False)
    assert max(seen) == 8  # 2 sampling batches of 4 rows, one row per fake-score chunk
    short = simulate(params, "rl", spec=spec, reward_specs=tiny_reward_specs(), flops=False, chunk_limit=2)
    # compared above what is resident after the load: a second simulation in one process is offset
    # by a few hundred bytes in every phase alike (208 when this was written)
    assert abs(short["resident_after_load"] - full["resident_after_load"]) < 1024

    def above_load(r):
        return {k: v - r["resident_after_load"] for k, v in r["peak_by_phase"].items()}

    a, b = above_load(short), above_load(full)
    # the one thing a skipped chunk leaves behind: its rows' reward values (a float32 each, kept for
    # the hinge's value) — 2 skipped BP chunks of one row here
    assert b.pop("bp") - a.pop("bp") == 2 * 4
    assert a == b
    assert short["chunk_limit"] == 2 and full["chunk_limit"] is None
    # skipped chunks would undercount FLOPs, so the limit is refused when they are counted
    with pytest.raises(ValueError, match="FLOPs"):
        simulate(params, "rl", spec=spec, reward_specs=tiny_reward_specs(), chunk_limit=2)
