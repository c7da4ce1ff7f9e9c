"""Stage-2 (RTDMD) trainer: groups across simulated ranks, step selection + shared noise, one RL
step through the trainer on toy2d (artifact chaining, EMA, logged metrics), bad input."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from rtdmd.algorithms import grpo
from rtdmd.algorithms.cps import cps_mean_std
from rtdmd.config import ConfigError, load_params
from rtdmd.train.rl_core import RLEngine

from rtdmd.testing.comm import run_ranks

from .rl_helpers import make_init_artifact, rl_trainer, toy_nets, write_toy_prompts

K, GLOBAL, NB = 4, 8, 2  # M = 2 prompts per sampling iteration, out of 9


def _params(tmp_path, *extra):
    prompts = write_toy_prompts(tmp_path / "prompts")
    return load_params("toy2d", [f"rl.prompts={prompts}", f"rl.num_images_per_prompt={K}",
                                 f"rl.global_sample_batch_size={GLOBAL}", f"rl.num_batches_per_epoch={NB}",
                                 "rl.fake_score_batch_size=0", *extra])


def _prompt_items(params):
    from rtdmd.train.rl import load_rl_prompts

    return load_rl_prompts(params.rl.prompts)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    params = _params(tmp_path_factory.mktemp("toy"))
    bb, nets = toy_nets(params)
    return params, bb, nets


def _epoch_data(params, bb, nets, world, epochs=(0, 1)):
    """Sampling + rewards + advantages of ``epochs`` on ``world`` simulated ranks."""
    prompts = _prompt_items(params)

    def work(comm):
        eng = RLEngine(params, bb, nets, prompts=prompts, comm=comm)
        out = []
        for e in epochs:
            eng.sampler.set_epoch(e)
            ro = eng.sample_epoch(e)
            rewards = eng.score(ro)
            adv, _ = eng.advantages(ro, rewards)
            out.append((ro, rewards, adv))
        return out

    return run_ranks(world, work)


def _global_rows(per_rank, epoch, bs):
    """Per sampling iteration, the rank-major concatenation of every rank's rows (global order)."""
    rows = []
    for b in range(NB):
        for r in range(len(per_rank)):
            ro, rewards, adv = per_rank[r][epoch]
            sl = slice(b * bs, (b + 1) * bs)
            rows += [(ro.prompts[i], ro.latents[i], ro.log_probs[i], rewards["mean"][i], adv[i])
                     for i in range(sl.start, sl.stop)]
    return rows


def test_groups_complete_and_world_size_invariant_on_1_2_4_ranks(toy):
    params, bb, nets = toy
    ref = None
    for world in (1, 2, 4):
        per_rank = _epoch_data(params, bb, nets, world)
        bs = GLOBAL // world
        for epoch in (0, 1):
            for b in range(NB):
                counts = Counter(p for r in range(world) for p in per_rank[r][epoch][0].prompts[b * bs:(b + 1) * bs])
                assert set(counts.values()) == {K}, (world, epoch, b, counts)  # every group complete
                assert len(counts) == GLOBAL // K
            rows = _global_rows(per_rank, epoch, bs)
            # advantages: zero mean per epoch batch, identical on every rank's slice
            assert abs(float(torch.stack([r[4] for r in rows]).mean())) < 1e-5
            if ref is None:
                continue
            for a, b_ in zip(ref[epoch], rows):  # same samples, rewards, advantages whatever W is
                assert a[0] == b_[0]  # (equal up to float reassociation of the smaller matmuls)
                assert torch.allclose(a[1], b_[1], atol=1e-5) and torch.allclose(a[2], b_[2], atol=1e-6)
                assert abs(float(a[3]) - float(b_[3])) < 1e-5
                assert abs(float(a[4]) - float(b_[4])) < 1e-4
        if ref is None:
            ref = {e: _global_rows(per_rank, e, bs) for e in (0, 1)}


def test_step_selection_deterministic_and_shared_noise_per_prompt(toy):
    params, bb, nets = toy
    prompts = _prompt_items(params)
    ss = params.rl.step_selection
    engines = [RLEngine(params, bb, nets, prompts=prompts) for _ in range(2)]
    seen = set()
    for e in range(12):
        ppo, all_steps = engines[0].train_steps(e)
        assert (ppo, all_steps) == engines[1].train_steps(e)
        assert ppo == sorted(ppo) and len(set(ppo)) == ss.num_steps
        assert all(ss.range_start <= j <= ss.range_end for j in ppo)
        assert ppo == grpo.select_train_steps(params.rl.seed, e, ss.range_start, ss.range_end, ss.num_steps)
        assert all_steps == sorted(set(ppo) | {3})  # + the deterministic last step (aux)
        seen.add(tuple(ppo))
    assert len(seen) > 1, "the selection must change across epochs"

    # the noise actually injected at step i, recovered as (x_{i+1} - mu_i) / rho_i
    epoch = 3
    per_rank = _epoch_data(params, bb, nets, 2, epochs=(epoch,))
    selected = engines[0].train_steps(epoch)[0]
    sig = engines[0].sigmas
    for i in range(3):
        noises: dict[str, list[torch.Tensor]] = {}
        for r in range(2):
            ro = per_rank[r][0][0]
            with torch.no_grad():
                v = bb.velocity(nets.generator, ro.latents[:, i], torch.full((ro.batch_size,), sig[i]), ro.cond)
                mu, rho = cps_mean_std(ro.latents[:, i], v, sig[i], sig[i + 1], params.sampler.eta)
            xi = (ro.latents[:, i + 1] - mu) / rho.reshape(-1, 1)
            for p, n in zip(ro.prompts, xi):
                noises.setdefault(p, []).append(n)
        for p, ns in noises.items():
            same = all(torch.allclose(ns[0], n, atol=1e-4) for n in ns[1:])
            if i in selected:
                assert not same, f"trained step {i} must get fresh noise"
            else:
                assert same, f"step {i} is not trained: its noise must be shared by the group of {p!r}"
                want = grpo.shared_step_noise(p, i, epoch, (2,))
                assert torch.allclose(ns[0], want, atol=1e-4)


def test_one_rl_step_on_toy2d_chains_artifact_and_logs(tmp_path):
    params = _params(tmp_path)
    init = make_init_artifact(params, tmp_path / "cs")
    from rtdmd.train.logging import build_logger

    over = [f"rl.prompts={params.rl.prompts}", f"rl.num_images_per_prompt={K}", f"rl.global_sample_batch_size={GLOBAL}",
            f"rl.num_batches_per_epoch={NB}", "rl.epochs=2", "rl.eval_interval=1", "rl.checkpoint.save_interval=1"]
    out = tmp_path / "rl"
    trainer = rl_trainer("toy2d", out, init, over, logger=build_logger(0, str(out)))
    manifest = trainer.run()
    trainer.logger.close()

    from rtdmd.lora.artifact import load_lora_artifact, stack_chain

    chain = stack_chain(str(out / "artifact"), backbone="toy2d")
    assert [a.manifest["stage"] for a in chain] == ["cold_start", "rl"]
    art = chain[-1]
    assert manifest["parent"] == {"uri": init, "manifest_sha256": load_lora_artifact(init).manifest_sha256}
    assert set(art.adapters) == {"generator", "fake_score"}
    assert manifest["steps"] == 2 and manifest["rl"]["implied_beta_bp"] == pytest.approx(0.05)
    # the published generator adapter is the policy EMA (one update per optimizer step: 2)
    assert trainer.ema.num_updates == 2
    for k, v in trainer.ema.shadow.items():
        from rtdmd.lora.core import canonical_key

        assert torch.equal(art.adapters["generator"].state[canonical_key(k)], v.float())
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in art.adapters["generator"].state.items()
               if "lora_B" in k), "the generator LoRA must have moved"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    for key in ("reward/toy2d_target", "reward/toy2d_region", "reward/mean", "adv/mean", "adv/std", "adv/clip_frac",
                "ppo/clip_frac", "ppo/ratio_mean", "dm/loss", "bp/reward", "fake/loss_ac", "gen/grad_norm",
                "grad_norm/ppo", "grad_norm/dm", "grad_norm/bp", "beta/bp", "eval/reward/mean"):
        assert key in keys, key
    first = next(r for r in rows if "ppo/ratio_mean" in r)
    assert abs(first["ppo/ratio_mean"] - 1.0) < 1e-4  # one optimizer step per epoch: ratio = 1
    state = json.loads((out / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["data"]["epoch"] == 2 and state["data"]["step"] == 0  # sampler position
    tracker = state["extra"]["engine"]["stat_tracker"]
    assert tracker["global_std"] is True and sum(len(v) for v in tracker["stats"].values()) == GLOBAL * NB


def test_loss_switches_select_terms(tmp_path):
    prompts = _prompt_items(_params(tmp_path))
    for extra, ppo_expected, aux_expected in [
        ((), True, [3]),
        (("rl.policy_gradient=false",), False, [3]),
        (("rl.last_step.loss=none", "rl.bp.enabled=false"), True, []),
        (("rl.last_step.loss=none",), True, [3]),  # BP alone keeps the aux step
    ]:
        params = _params(tmp_path, *extra)
        bb, nets = toy_nets(params)
        eng = RLEngine(params, bb, nets, prompts=prompts)
        ppo, _ = eng.train_steps(0)
        assert bool(ppo) == ppo_expected and eng.aux_steps == aux_expected, extra


def test_kl_to_reference_policy_term(tmp_path):
    """rl.kl_beta > 0 adds kl_beta * mean (mu - mu_ref)^2 / (2 rho^2) with mu_ref from the adapters-off net."""
    params = _params(tmp_path, "rl.kl_beta=0.5")
    bb, nets = toy_nets(params)
    eng = RLEngine(params, bb, nets, prompts=_prompt_items(params))
    ro = eng.sample_epoch(0)
    g = torch.Generator().manual_seed(0)
    adv = torch.zeros(ro.batch_size)
    terms, m = eng._step_terms(ro, adv, 0, True, False, g, 1.0)
    assert float(terms["kl"]) == 0.0  # fresh LoRA (B = 0): the policy is the reference
    with torch.no_grad():
        for name, p in nets.gen_params.items():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    terms, m = eng._step_terms(ro, adv, 0, True, False, g, 1.0)
    assert float(terms["kl"]) > 0 and m["ppo/kl"] == pytest.approx(float(terms["kl"]) / 0.5)
    terms["kl"].backward()
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in nets.gen_params.values())


# ------------------------------------------------------------------------------------- bad input
def test_unknown_reward_lists_valid_ones(tmp_path):
    from rtdmd.rewards import UnknownRewardError

    init = make_init_artifact(_params(tmp_path), tmp_path / "cs")
    t = rl_trainer("toy2d", tmp_path / "rl", init, ["rl.reward_weights={toy2d_targt: 1.0}"])
    with pytest.raises(UnknownRewardError, match=r"toy2d_targt.*valid rewards: .*toy2d_target"):
        t.run()


def test_non_differentiable_reward_for_bp_is_refused(tmp_path):
    from rtdmd.rewards import RewardNotDifferentiableError

    init = make_init_artifact(_params(tmp_path), tmp_path / "cs")
    t = rl_trainer("toy2d", tmp_path / "rl", init, ["rl.bp.rewards={toy2d_region: 1.0}"])
    with pytest.raises(RewardNotDifferentiableError, match=r"toy2d_region.*not differentiable.*toy2d_target"):
        t.run()
    assert not (tmp_path / "rl" / "checkpoints").exists()


def test_k_must_divide_global_batch_and_world_size_must_divide_it(tmp_path):
    with pytest.raises(ConfigError, match=r"num_images_per_prompt \(K=5\) must divide rl.global_sample_batch_size"):
        load_params("toy2d", ["rl.num_images_per_prompt=5"])
    from rtdmd.dist import DistEnv

    t = rl_trainer("toy2d", tmp_path / "rl", "unused")
    t.env = DistEnv(rank=0, world=5)
    with pytest.raises(ValueError, match="not divisible by the world size 5"):
        t.run()


def test_init_artifact_checksum_backbone_and_missing_init_are_refused(tmp_path):
    from rtdmd.artifacts.fs import ArtifactError
    from rtdmd.train.rl_core import RLConfigError

    params = _params(tmp_path)
    over = [f"rl.prompts={params.rl.prompts}"]
    with pytest.raises(RLConfigError, match="needs --init"):
        rl_trainer("toy2d", tmp_path / "a", None, over).run()
    wrong = make_init_artifact(params, tmp_path / "wrong", backbone_name="tiny_sd3")
    with pytest.raises(ArtifactError, match="trained for backbone 'tiny_sd3', not 'toy2d'"):
        rl_trainer("toy2d", tmp_path / "b", wrong, over).run()
    corrupt = make_init_artifact(params, tmp_path / "corrupt")
    weights = tmp_path / "corrupt" / "generator" / "pytorch_lora_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 .* does not match the manifest"):
        rl_trainer("toy2d", tmp_path / "c", corrupt, over).run()


def test_non_finite_loss_stops_with_term_named(tmp_path):
    from rtdmd.train.base import NonFiniteLossError

    params = _params(tmp_path)
    init = make_init_artifact(params, tmp_path / "cs")
    over = [f"rl.prompts={params.rl.prompts}", f"rl.num_images_per_prompt={K}", f"rl.global_sample_batch_size={GLOBAL}",
            "rl.epochs=3", "rl.eval_interval=0"]
    trainer = rl_trainer("toy2d", tmp_path / "rl", init, over)
    trainer.params.rl.bp.margin = float("nan")  # params files refuse non-finite numbers; inject past them
    with pytest.raises(NonFiniteLossError, match=r"step 0: term 'gen/bp'=nan"):
        trainer.run()
    assert not (tmp_path / "rl" / "artifact").exists()


@pytest.mark.parametrize("weighted", [True, False])
def test_advantages_match_group_advantages_on_the_gathered_batch(tmp_path, weighted):
    params = _params(tmp_path, f"rl.weight_advantages={str(weighted).lower()}", "rl.adv_clip_max=1.5")
    bb, nets = toy_nets(params)
    eng = RLEngine(params, bb, nets, prompts=_prompt_items(params))
    ro = eng.sample_epoch(0)
    rewards = eng.score(ro)
    adv, stats = eng.advantages(ro, rewards)
    w = dict(params.rl.reward_weights)
    if weighted:
        want = grpo.group_advantages(ro.prompts, rewards, weights=w, global_std=True, clip=1.5)
    else:
        total = sum(wk * rewards[k] for k, wk in w.items())
        want = grpo.group_advantages(ro.prompts, total, global_std=True, clip=1.5)
    assert torch.allclose(adv, want, atol=1e-6)
    assert float(adv.abs().max()) <= 1.5 and stats["adv/clip_frac"] == float((want.abs() >= 1.5).float().mean())
    # a constant reward gives exactly zero advantages (before any renormalisation) -> all rows filtered
    const = {k: torch.full_like(v, 0.25) for k, v in rewards.items()}
    if not weighted:
        adv0, _ = eng.advantages(ro, const)
        assert torch.equal(adv0, torch.zeros_like(adv0))
        keep = grpo.filter_zero_advantages(adv0, NB, torch.Generator().manual_seed(0))
        assert keep.numel() == NB  # none survive: NB random rows are kept (§6.4)


def test_chunked_bp_gives_the_same_update_as_one_backward(tmp_path):
    """rl.bp.batch_size bounds memory (per-chunk backward) without changing the gradient."""
    params = _params(tmp_path)
    init = make_init_artifact(params, tmp_path / "cs")
    base = [f"rl.prompts={params.rl.prompts}", f"rl.num_images_per_prompt={K}", f"rl.global_sample_batch_size={GLOBAL}",
            f"rl.num_batches_per_epoch={NB}", "rl.epochs=1", "rl.eval_interval=100",
            "rl.policy_gradient=false", "rl.last_step.loss=none", "rl.bp.grad_scale=0.5"]
    from rtdmd.lora.artifact import load_lora_artifact

    states = []
    for chunk in (0, 1, 3):
        out = tmp_path / f"rl{chunk}"
        rl_trainer("toy2d", out, init, [*base, f"rl.bp.batch_size={chunk}", "rl.ema_decay=0.0"]).run()
        states.append(load_lora_artifact(str(out / "artifact")).adapters["generator"].state)
    # the RL adapter is fresh (B = 0) on top of the merged cold start: non-zero B means BP moved it
    assert max(float(states[0][k].abs().max()) for k in states[0] if "lora_B" in k) > 0
    for other in states[1:]:
        for k in states[0]:
            torch.testing.assert_close(other[k], states[0][k], rtol=1e-4, atol=1e-6)


def test_score_decodes_one_sampling_batch_at_a_time(toy):
    """Decode + reward run per sampling batch (the epoch's NB·bs images are never decoded at once),
    and the rewards equal one call on the whole epoch."""
    params, bb, nets = toy
    eng = RLEngine(params, bb, nets, prompts=_prompt_items(params))
    eng.sampler.set_epoch(0)
    ro = eng.sample_epoch(0)
    assert ro.batch_size == NB * eng.bs
    sizes = []
    real_decode = eng.decode

    def decode(latents):
        sizes.append(latents.shape[0])
        return real_decode(latents)

    eng.decode = decode
    rewards = eng.score(ro)
    assert sizes == [eng.bs] * NB
    whole = eng.reward_fn(real_decode(ro.latents[:, -1]), ro.prompts, None)
    for k, v in whole.items():
        torch.testing.assert_close(rewards[k], v.float().cpu(), rtol=1e-6, atol=1e-6)
