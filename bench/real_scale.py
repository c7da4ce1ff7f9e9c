"""Item 7 — real-scale estimate on paper: per-GPU memory and step FLOPs per backbone and stage.

Inputs: the architecture facts of :mod:`bench.arch` (models instantiated on the meta device:
exact parameter counts, LoRA sizes, FLOPs by ``FlopCounterMode``) and the reference settings in
``params/<backbone>.yaml`` (spec §10: resolution, global batches, GPUs per stage, strategy,
sharding, gradient checkpointing, fake / BP chunk sizes, consistency on/off).

Memory model per GPU (bytes; bf16 = 2, fp32 = 4):

* frozen weights: teacher + generator + fake-score transformers (3 copies, bf16), sharded
  ``/N`` under FSDP (``rtdmd.train.roles`` shards all three), full under DDP; text encoder(s)
  and VAE (bf16) and, in stage 2, the reward models (fp32, ``rtdmd.rewards``) are not sharded;
* LoRA (generator + fake score): fp32 master + fp32 grad + AdamW m, v = 16 B/param, + the
  generator's fp32 EMA shadow (4 B/param); sharded ``/N`` under FSDP;
* activations per sample with grad: Σ of leaf-module outputs of all blocks (meta run; ≈ 16
  elements per token per width per block, flash attention assumed) in bf16; with gradient
  checkpointing: the block inputs (tokens × width per block) + one block recomputed;
  peaks: stage 1 = critic turn (anchor + two consistency forwards alive → 3 graphs at the
  per-GPU batch); stage 2 = max(fake update: 3 graphs at ``fake_score_batch_size``; generator
  update: 1 graph at the per-GPU sample batch + VAE decode and BP reward graphs of one BP chunk,
  or of the whole sub-batch if the engine back-propagates the chunks together —
  :func:`bp_chunks_bound_memory` reads which from the code);
* FSDP all-gather buffers: 2 unsharded blocks (bf16); plus ~3 GB CUDA context / allocator slack.

FLOPs per step (global; ÷ GPUs for per-GPU): stage 1 iteration per sample
``F_te + E[S]·F + c·FB + (E[S]−1 + 1 + 2 + 1)·F/R + FB/R`` (random stop ``E[S] = (K+1)/2``, critic
``c = 3`` fake forward+backward with consistency, generator turn every ``R`` iterations: rollout,
teacher CFG = 2 forwards, fake forward); stage 2 epoch per image ``F_te + K·F + VAE + rewards +
c·FB (fake) + |steps|·FB + 3·F (teacher CFG + fake) + BP (VAE + BP rewards, forward+backward)``.
``FB`` = LoRA forward+backward with frozen base (counted on meta with LoRA injected), +1 forward
with gradient checkpointing.
"""
from __future__ import annotations

import sys
from pathlib import Path

GB = 1e9
GPU_GB = 80
SLACK_GB = 3.0
KEYS = ("flux2_4b", "flux2_9b", "sd35m", "sd3m", "flux1_dev")
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM (for the illustrative time column)
MFU = 0.4


def bp_chunks_bound_memory() -> bool:
    """Does the RL engine back-propagate each BP chunk before decoding the next one?

    Read from the code (``RLEngine._bp_term`` calls ``.backward(`` inside the BP chunk loop),
    so the estimate follows the implementation: if not, every chunk's VAE-decode + reward graph
    stays alive until the single backward and ``rl.bp.batch_size`` does not bound memory.
    """
    import inspect

    from rtdmd.train.rl_core import RLEngine

    src = inspect.getsource(RLEngine._bp_term)
    loop = src[src.find("for start in range(0, b, chunk)"):]
    return ".backward(" in loop


def _gpus(p, stage: str) -> tuple[int, int]:
    c = getattr(p.compute, "cold_start" if stage == "cold_start" else "rl")
    return int(c.nodes), int(c.gpus_per_node)


def backbone_facts(key: str) -> dict:
    from bench import arch
    from rtdmd.config import load_params

    p = load_params(key)
    res = int(p.model.resolution)
    tc = arch.transformer_costs(key, res, int(p.lora.rank), tuple(p.lora.targets))
    te = arch.text_costs(key)
    vae = arch.vae_costs(key, res)
    act = tc["profile"]
    vae_act = arch.vae_decode_activation_elems(key, res) * 2
    return {"params": p, "res": res, "tc": tc, "te": te, "vae": vae, "act": act, "vae_act_bytes": vae_act}


def memory(f: dict, stage: str, world: int, strategy: str, shard: int, gc: bool) -> dict:
    """Per-GPU bytes by component for one configuration."""
    from bench.arch import REWARDS

    p, tc, act = f["params"], f["tc"], f["act"]
    n = shard if strategy == "fsdp" else 1
    frozen = 3 * tc["params"] * 2 / n
    other = (f["te"]["params"] + f["vae"]["params"]) * 2
    rewards = 0.0
    if stage == "rl":
        rewards = sum(REWARDS[k]["params_m"] for k in p.rl.reward_weights if k in REWARDS) * 1e6 * 4
    lora = (2 * 16 + 4) * tc["lora_numel"] / n
    per_sample_full = act["act_elems_all_blocks"] * 2
    per_sample_gc = act["blocks"] * act["block_input_elems"] * 2
    one_block = act["act_elems_all_blocks"] / act["blocks"] * 2

    def graphs(batch: int, copies: int) -> float:
        return copies * batch * (per_sample_gc if gc else per_sample_full) + (batch * one_block if gc else 0)

    if stage == "cold_start":
        b = p.cold_start.global_batch_size // world
        cons = 3 if p.consistency.enabled else 1
        acts = graphs(b, cons)
        detail = f"critic: {cons} graphs × batch {b}"
    else:
        rl = p.rl
        b = rl.global_sample_batch_size // world
        fc = rl.fake_score_batch_size or b
        cons = 3 if (rl.last_step.consistency and p.consistency.enabled) else 1
        # as implemented (bp_chunks_bound_memory): per-chunk backward -> one chunk's decode + reward graph
        # alive; one backward for all chunks -> the whole sub-batch b, whatever rl.bp.batch_size says
        bp = (rl.bp.batch_size or b) if bp_chunks_bound_memory() else b
        bp_reward_act = sum(REWARDS[k].get("act_gb_per_image", 0.0) for k in p.rl.reward_weights
                            if k in ("clipscore", "hpsv2", "pickscore")) * GB
        gen = graphs(b, 1) + (bp * (f["vae_act_bytes"] + bp_reward_act) if rl.bp.enabled else 0)
        fake = graphs(fc, cons)
        acts = max(gen, fake)
        detail = (f"max(generator: batch {b} + BP decode/rewards × {bp}, fake: {cons} graphs × {fc})")
        b = f"{b} (fake {fc}, bp chunk {rl.bp.batch_size or b})"
    gather = 2 * act["max_block_params"] * 2 if strategy == "fsdp" else 0
    total = frozen + other + rewards + lora + acts + gather + SLACK_GB * GB
    return {"frozen_transformers_gb": frozen / GB, "text_enc_vae_gb": other / GB, "rewards_gb": rewards / GB,
            "lora_optim_ema_gb": lora / GB, "activations_gb": acts / GB, "fsdp_gather_gb": gather / GB,
            "total_gb": total / GB, "per_gpu_batch": b, "activation_peak": detail}


def flops(f: dict, stage: str, gc: bool) -> dict:
    from bench.arch import BP_REWARDS, REWARDS

    p, tc = f["params"], f["tc"]
    F, FB = tc["fwd_flops"], tc["fwd_bwd_flops"] + (tc["fwd_flops"] if gc else 0)
    te = f["te"]["fwd_flops"]
    k = len(p.sampler.step_list)
    if stage == "cold_start":
        cs = p.cold_start
        es = (k + 1) / 2 if cs.random_stop else k
        r = cs.fake_update_ratio
        c = 3 if p.consistency.enabled else 1
        per = te + es * F + c * FB + ((es - 1) * F + FB + 2 * F + F) / r
        n = cs.global_batch_size
        unit = "iteration"
    else:
        rl = p.rl
        ppo = (rl.step_selection.num_steps if rl.step_selection.enabled else k - 1) if rl.policy_gradient else 0
        steps = ppo + 1  # + the final-step AC-DMD / BP forward
        c = 3 if (rl.last_step.consistency and p.consistency.enabled) else 1
        rew = sum(REWARDS[x]["gflop_fwd"] * 1e9 for x in rl.reward_weights if x in REWARDS)
        bp_rew = sum(REWARDS[x]["gflop_fwd"] * 1e9 for x in rl.reward_weights if x in BP_REWARDS)
        vae = f["vae"]["decode_flops"]
        per = (te + k * F + vae + rew + c * FB + steps * FB + 3 * F
               + ((2 * vae + 2 * bp_rew) if rl.bp.enabled else 0))
        n = rl.global_sample_batch_size * rl.num_batches_per_epoch
        unit = "epoch"
    nodes, gpn = _gpus(p, stage)
    world = nodes * gpn
    total = per * n
    return {"unit": unit, "samples": n, "pflop_per_sample": per / 1e15, "pflop_total": total / 1e15,
            "pflop_per_gpu": total / world / 1e15,
            "est_s_at_40pct_h100": total / world / (MFU * H100_BF16_TFLOPS * 1e12)}


def run(quick: bool, workdir: Path) -> dict:
    keys = KEYS[:1] if quick else KEYS
    arch_rows, mem_rows, opt_rows = [], [], []
    for key in keys:
        f = backbone_facts(key)
        p, tc = f["params"], f["tc"]
        from bench.arch import TRANSFORMERS

        arch_rows.append({"backbone": key, "transformer B params": tc["params"] / 1e9, "blocks": tc["blocks"],
                          "width": tc["width"], "img+txt tokens": f"{tc['image_tokens']}+{tc['text_tokens']}",
                          "text enc B params": f["te"]["params"] / 1e9, "VAE M params": f["vae"]["params"] / 1e6,
                          "LoRA r32 M params/role": tc["lora_numel"] / 1e6,
                          "fwd TFLOP/sample": tc["fwd_flops"] / 1e12,
                          "LoRA fwd+bwd TFLOP/sample": tc["fwd_bwd_flops"] / 1e12,
                          "unsure": TRANSFORMERS[key].get("unsure", "")})
        gc_ref = bool(p.distributed.gradient_checkpointing)
        for stage in ("cold_start", "rl"):
            nodes, gpn = _gpus(p, stage)
            world = nodes * gpn
            strat = p.distributed.strategy
            shard = world if (p.distributed.fsdp_sharding != "hybrid_shard" or nodes == 1) else gpn
            ref = memory(f, stage, world, strat, shard, gc_ref)
            nogc = memory(f, stage, world, strat, shard, False)
            fl = flops(f, stage, gc_ref)
            mem_rows.append({
                "backbone": key, "stage": stage,
                "reference": f"{nodes}×{gpn} {strat}{'/' + p.distributed.fsdp_sharding if strat == 'fsdp' else ''}"
                             f"{' +GC' if gc_ref else ''}",
                "per-GPU batch": ref["per_gpu_batch"], "frozen weights GB": ref["frozen_transformers_gb"],
                "text enc+VAE GB": ref["text_enc_vae_gb"], "rewards GB": ref["rewards_gb"],
                "LoRA+Adam+EMA GB": ref["lora_optim_ema_gb"], "activations GB": ref["activations_gb"],
                "activations no-GC GB": nogc["activations_gb"], "total GB/GPU": ref["total_gb"],
                "fits 80 GB": ref["total_gb"] <= GPU_GB, "total no-GC GB": nogc["total_gb"],
                "step": fl["unit"], "PFLOP/step (global)": fl["pflop_total"], "PFLOP/step/GPU": fl["pflop_per_gpu"],
                "s at 40% H100": fl["est_s_at_40pct_h100"]})
            row = {"backbone": key, "stage": stage}
            for label, w, strat_, sh in (("DDP ×8", 8, "ddp", 1), ("FSDP ×8", 8, "fsdp", 8),
                                         ("FSDP ×16", 16, "fsdp", 16), ("FSDP ×32", 32, "fsdp", 32)):
                gb = p.cold_start.global_batch_size if stage == "cold_start" else p.rl.global_sample_batch_size
                if gb % w:
                    row[label + " GB (GC)"] = None
                    continue
                m = memory(f, stage, w, strat_, sh, True)
                row[label + " GB (GC)"] = m["total_gb"]
            opt_rows.append(row)
    fits = [r for r in mem_rows if r["fits 80 GB"]]
    if bp_chunks_bound_memory():
        bp_note = ("stage 2: rtdmd/train/rl_terms.py back-propagates each BP chunk before the next one, so the VAE-decode "
                   "+ BP-reward activations (≈5 GB/image at 512 px, bf16 VAE + fp32 rewards) count rl.bp.batch_size "
                   "images (0 = the whole per-GPU batch)")
    else:
        bp_note = ("stage 2: rtdmd/train/rl_terms.py decodes/scores the BP chunks one by one but back-propagates them "
                   "in one backward, so every chunk's VAE-decode + reward graph (≈5 GB/image at 512 px) is alive at "
                   "once and rl.bp.batch_size does not bound memory")
    return {"title": "Real-scale estimate (paper)", "metric": "reference configs that fit 80 GB GPUs",
            "value": f"{len(fits)}/{len(mem_rows)}", "target": "table (no target)", "met": None, "threads": None,
            "repeats": None, "table": mem_rows, "architectures": arch_rows, "sharding_options": opt_rows,
            "finding": (f"{len(fits)}/{len(mem_rows)} reference configs fit 80 GB"
                        + "".join(f"; {r['backbone']} {r['stage']} needs ≈{r['total GB/GPU']:.0f} GB"
                                  for r in mem_rows if not r["fits 80 GB"]) + ". " + bp_note),
            "notes": ["memory/FLOP model in bench/real_scale.py docstring; architecture facts in bench/arch.py "
                      "(models built on the meta device from those facts)",
                      "text encoder and VAE stay unsharded on every GPU (as the adapters load them); offloading "
                      "or pre-computing prompt embeddings would remove 'text enc+VAE GB'",
                      f"'s at 40% H100' = PFLOP/GPU ÷ (0.4 × {H100_BF16_TFLOPS:.0f} TFLOP/s bf16): an illustration, "
                      "not a measurement",
                      bp_note,
                      "sharding options keep the global batches of params/*.yaml (per-GPU batch = global / GPUs); "
                      "'–' = global batch not divisible"]}


def main(argv=None) -> int:
    from bench.common import item_main

    return item_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
