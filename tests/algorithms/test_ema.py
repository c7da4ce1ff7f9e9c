"""Tests for rtdmd.algorithms.ema (invariant 25; §8.3 stage-1 EMA; §12.3 / §12.14)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rtdmd.algorithms.ema import ModelEMA, PolicyEMA, named_tensors


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "block.lora_A.default.weight": nn.Parameter(torch.randn(4, 6, generator=g).to(dtype)),
        "block.lora_B.default.weight": nn.Parameter(torch.randn(5, 4, generator=g).to(dtype)),
    }


def perturb(params, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def snapshot(params):
    return {k: v.detach().clone() for k, v in params.items()}


def bit_equal(a, b):
    """Bit-exact comparison (distinguishes -0.0 from 0.0, unlike torch.equal)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8))
        for k in a
    )


# ----------------------------------------------------------------------------------------------
# ModelEMA (stage 1)
# ----------------------------------------------------------------------------------------------


def test_model_ema_update_formula():
    params = make_params(torch.float64)
    ema = ModelEMA(params, decay=0.99, shadow_dtype=torch.float64)
    expected = snapshot(params)
    for it in range(5):
        perturb(params, seed=it + 1)
        assert ema.update(params)
        for k in expected:
            expected[k] = 0.99 * expected[k] + 0.01 * params[k].detach()
    for k in expected:
        torch.testing.assert_close(ema.shadow[k], expected[k], rtol=1e-12, atol=1e-12)
    assert ema.num_updates == 5


def test_model_ema_every_and_explicit_step():
    params = make_params()
    ema = ModelEMA(params, decay=0.5, every=3)
    start = snapshot(ema.shadow)
    perturb(params, seed=1)
    results = [ema.update(params) for _ in range(7)]  # internal counter 0..6
    assert results == [True, False, False, True, False, False, True]
    assert ema.num_updates == 3 and ema.num_calls == 7
    assert ema.update(params, step=10) is False
    assert ema.update(params, step=12) is True
    assert not torch.equal(ema.shadow["block.lora_A.default.weight"], start["block.lora_A.default.weight"])


def test_model_ema_shadow_is_fp32_copy_not_alias():
    params = make_params(torch.bfloat16)
    ema = ModelEMA(params)
    for k, p in params.items():
        assert ema.shadow[k].dtype == torch.float32
        assert ema.shadow[k].data_ptr() != p.data_ptr()
        assert torch.equal(ema.shadow[k], p.detach().float())
    perturb(params, seed=3)
    assert not torch.equal(ema.shadow["block.lora_A.default.weight"], params["block.lora_A.default.weight"].float())


def test_bf16_shadow_is_sticky_fp32_is_not():
    """§12.3: a bf16 shadow rounds small EMA increments away."""
    base = {"w": nn.Parameter(torch.ones(64, dtype=torch.float32))}
    ema_bf16 = ModelEMA(base, decay=0.99, shadow_dtype=torch.bfloat16)
    ema_fp32 = ModelEMA(base, decay=0.99, shadow_dtype=torch.float32)
    with torch.no_grad():
        base["w"].fill_(1.2)  # 0.01 * 0.2 = 0.002 < half a bf16 ulp at 1.0 (0.0039)
    for _ in range(20):
        ema_bf16.update(base)
        ema_fp32.update(base)
    assert torch.all(ema_bf16.shadow["w"] == 1.0)  # never moves
    expected = 1.2 - 0.2 * 0.99**20
    torch.testing.assert_close(ema_fp32.shadow["w"], torch.full((64,), expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_model_ema_swap_round_trip_is_exact(param_dtype):
    params = make_params(param_dtype)
    ema = ModelEMA(params, decay=0.9)
    for s in range(3):
        perturb(params, seed=10 + s)
        ema.update(params)
    perturb(params, seed=20)
    live = snapshot(params)
    with ema.swapped_in(params):
        for k, p in params.items():
            assert torch.equal(p.detach(), ema.shadow[k].to(param_dtype))
            assert not torch.equal(p.detach(), live[k])
        # Mutate in place inside the block (e.g. an eval that touched weights).
        with torch.no_grad():
            for p in params.values():
                p.mul_(3.0).add_(1.0)
    assert bit_equal(snapshot(params), live)


def test_swap_restores_on_exception():
    params = make_params()
    ema = PolicyEMA(params)
    perturb(params, seed=4)
    live = snapshot(params)
    with pytest.raises(RuntimeError):
        with ema.swapped_in(params):
            raise RuntimeError("eval failed")
    assert bit_equal(snapshot(params), live)


def test_model_ema_state_round_trip():
    params = make_params()
    ema = ModelEMA(params, decay=0.95, every=2)
    for s in range(5):
        perturb(params, seed=30 + s)
        ema.update(params)
    state = ema.state_dict()
    meta = {k: v for k, v in state.items() if k != "shadow"}
    meta = json.loads(json.dumps(meta))  # everything but the tensors is plain JSON
    shadow = {k: v.clone() for k, v in state["shadow"].items()}
    assert all(isinstance(v, torch.Tensor) for v in shadow.values())
    assert meta["shadow_dtype"] == "float32" and meta["num_calls"] == 5 and meta["num_updates"] == 3

    other = ModelEMA(make_params(seed=99), decay=0.95, every=2)
    other.load_state_dict({**meta, "shadow": shadow})
    assert bit_equal(other.shadow, ema.shadow)
    assert other.num_calls == ema.num_calls and other.num_updates == ema.num_updates
    perturb(params, seed=50)
    assert ema.update(params) == other.update(params)
    assert bit_equal(other.shadow, ema.shadow)


def test_model_ema_load_rejects_mismatch():
    params = make_params()
    ema = ModelEMA(params)
    state = ema.state_dict()
    with pytest.raises(ValueError):
        ModelEMA(params, shadow_dtype=torch.bfloat16).load_state_dict(state)
    with pytest.raises(KeyError):
        ModelEMA({"other": nn.Parameter(torch.zeros(2))}).load_state_dict(state)
    with pytest.raises(ValueError):
        PolicyEMA(params).load_state_dict(state)  # wrong kind
    with pytest.raises(KeyError):
        ema.update({"block.lora_A.default.weight": params["block.lora_A.default.weight"]})


def test_named_tensors_accepts_module_and_pairs():
    module = nn.Linear(3, 2)
    named = named_tensors(module)
    assert list(named) == ["weight", "bias"]
    assert named_tensors(module.named_parameters()).keys() == named.keys()
    with pytest.raises(ValueError):
        named_tensors([("a", torch.zeros(1)), ("a", torch.zeros(1))])
    ema = ModelEMA(module, decay=0.0)
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update(module)  # decay 0 -> shadow = live
    assert torch.equal(ema.shadow["weight"], module.weight.detach())


# ----------------------------------------------------------------------------------------------
# PolicyEMA (stage 2) — invariant 25
# ----------------------------------------------------------------------------------------------


def test_policy_ema_skips_unless_interval():
    params = make_params()
    ema = PolicyEMA(params, decay=0.9, interval=8)
    start = snapshot(ema.shadow)
    perturb(params, seed=1)
    for n in range(7):
        assert ema.step(params, n) is False
    assert bit_equal(snapshot(ema.shadow), start)
    assert ema.step(params, 7) is True
    assert not torch.equal(ema.shadow["block.lora_B.default.weight"], start["block.lora_B.default.weight"])
    for n in range(8, 15):
        assert ema.step(params, n) is False
    assert ema.step(params, 15) is True
    assert ema.num_updates == 2


def test_policy_ema_decay_schedule():
    ema = PolicyEMA(make_params(), decay=0.9, interval=8)
    assert ema.current_decay(0) == pytest.approx(0.1)
    assert ema.current_decay(7) == pytest.approx(8 / 17)
    assert ema.current_decay(80) == pytest.approx(81 / 90)  # = 0.9 exactly at n = 80
    assert ema.current_decay(1000) == pytest.approx(0.9)
    assert all(ema.current_decay(n) <= 0.9 for n in range(0, 500))


def test_policy_ema_update_values():
    params = make_params(torch.float64)
    ema = PolicyEMA(params, decay=0.9, interval=2)
    assert all(s.dtype == torch.float64 for s in ema.shadow.values())  # parameter dtype by default
    expected = snapshot(params)
    for n in range(12):
        perturb(params, seed=100 + n)
        ema.step(params, n)
        if (n + 1) % 2 == 0:
            d = min((1 + n) / (10 + n), 0.9)
            for k in expected:
                expected[k] = expected[k] + (1 - d) * (params[k].detach() - expected[k])
    for k in expected:
        torch.testing.assert_close(ema.shadow[k], expected[k], rtol=1e-12, atol=1e-12)


def test_policy_ema_swap_round_trip_and_state():
    params = make_params(torch.bfloat16)
    ema = PolicyEMA(params, decay=0.9, interval=1)
    for n in range(4):
        perturb(params, seed=200 + n)
        ema.step(params, n)
    live = snapshot(params)
    with ema.swapped_in(params):
        for k, p in params.items():
            assert torch.equal(p.detach(), ema.shadow[k])
    assert bit_equal(snapshot(params), live)

    state = ema.state_dict()
    assert state["kind"] == "policy_ema" and state["interval"] == 1 and state["shadow_dtype"] == "bfloat16"
    other = PolicyEMA(make_params(torch.bfloat16, seed=7), decay=0.9, interval=1)
    other.load_state_dict({**state, "shadow": {k: v.clone() for k, v in state["shadow"].items()}})
    assert bit_equal(other.shadow, ema.shadow) and other.num_updates == 4


def test_policy_ema_rejects_negative_step():
    with pytest.raises(ValueError):
        PolicyEMA(make_params()).step(make_params(), -1)


def test_policy_ema_sub_batch_cadence_matches_the_reference_call_pattern():
    """§12.4: the reference calls step(n) after each of its NB sub-batches (n = optimizer steps so
    far, one optimizer step per epoch at the last sub-batch). rl.ema_cadence: sub_batch reproduces
    it with one call per optimizer step, n = steps so far, repeats = NB — bit for bit."""
    nb, epochs, interval = 16, 20, 8
    thetas = [{"w": torch.full((3,), float(k) + 0.25 * k * k)} for k in range(epochs + 1)]
    ref = PolicyEMA(thetas[0], decay=0.9, interval=interval)
    ours = PolicyEMA(thetas[0], decay=0.9, interval=interval)
    for e in range(epochs):
        for sb in range(nb):
            last = sb == nb - 1  # the optimizer step happens in the last sub-batch
            ref.step(thetas[e + 1] if last else thetas[e], e + 1 if last else e)
        ours.step(thetas[e + 1], e + 1, repeats=nb)  # after the step of epoch e
    assert torch.equal(ref.shadow["w"], ours.shadow["w"]) and ref.num_updates == ours.num_updates == 2 * nb


def test_policy_ema_sub_batch_retention_is_decay_to_the_nb():
    """At an update step the shadow keeps 0.9^16 ≈ 0.185 of itself (a delayed snapshot)."""
    ema = PolicyEMA({"w": torch.zeros(4)}, decay=0.9, interval=8)
    assert ema.step({"w": torch.ones(4)}, 799, repeats=16)
    assert torch.allclose(ema.shadow["w"], torch.full((4,), 1 - 0.9 ** 16), atol=1e-6)
    assert not ema.step({"w": torch.ones(4)}, 800, repeats=16)  # not an update step
