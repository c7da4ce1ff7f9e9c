"""``distributed.share_base``: one frozen base with a LoRA adapter per role gives the same losses and
gradients as the reference's separate full copies, and holds one base instead of three."""
from __future__ import annotations

import pytest
import torch

from rtdmd.backbones import build_backbone
from rtdmd.config import load_params
from rtdmd.dist import DistEnv
from rtdmd.train.roles import build_roles
from rtdmd.train.shared_base import RoleView

from .helpers import make_trainer, write_prompts
from .rl_helpers import make_init_artifact

TINY = ["model.resolution=32", "distributed.mixed_precision=fp32", "distributed.gradient_checkpointing=true"]


def _roles(name, share, over=(), init=None):
    params = load_params(name, ["distributed.strategy=none", f"distributed.share_base={share}", *TINY, *over])
    bb = build_backbone(params)
    torch.manual_seed(0)
    return bb, build_roles(bb, params, DistEnv(), init_uri=init, log=lambda m: None)


def _step(bb, roles):
    """Generator forward with grad, fake-score forward with grad on its output, teacher (no grad),
    one backward of a loss over both: under gradient checkpointing the recomputation of the
    generator's blocks runs after the fake score was last active on a shared base."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(bb.latent_shape(2), generator=g)
    s = torch.tensor([0.7, 0.4])
    cond = bb.encode_prompts(["a red cat", "a blue car"])
    v_gen = bb.velocity(roles.nets["generator"], x, s, cond)
    x0 = x - s.view(-1, *[1] * (x.dim() - 1)) * v_gen
    v_fake = bb.velocity(roles.nets["fake_score"], x0, s, cond)
    with torch.no_grad():
        v_real = bb.velocity(roles.teacher, x0, s, cond)
    loss = (v_fake - v_real).pow(2).mean() + 0.1 * v_gen.pow(2).mean()
    loss.backward()
    grads = {f"{r}/{n}": p.grad.clone() for r in ("generator", "fake_score")
             for n, p in roles.lora_params(r).items()}
    return loss.detach(), grads


@pytest.mark.parametrize("name", ["tiny_flux2", "tiny_sd3"])
def test_shared_equals_separate_copies_cold_start(name):
    """Stage 1 (fresh adapters): bit-identical loss and gradients."""
    got = {share: _step(*_roles(name, share)) for share in ("true", "false")}
    assert torch.equal(got["true"][0], got["false"][0])
    assert got["true"][1].keys() == got["false"][1].keys() and got["true"][1]
    for key, grad in got["false"][1].items():
        assert torch.equal(got["true"][1][key], grad), key
    assert any(float(g.abs().max()) > 0 for g in got["true"][1].values())


@pytest.mark.parametrize("name", ["tiny_flux2", "tiny_sd3"])
def test_shared_equals_separate_copies_stage2(name, tmp_path):
    """Stage 2 (--init): the shared base keeps the stage-1 adapters unmerged; the separate layout
    merges them. Equal up to fp32 rounding: loss to relative 1e-4, each gradient tensor to 1e-4 of
    its largest entry (measured: ~1e-5) — and different from ignoring the init."""
    params = load_params(name, ["distributed.strategy=none", *TINY])
    init = make_init_artifact(params, tmp_path / "cs", scale=0.05)
    shared_bb, shared = _roles(name, "true", init=init)
    assert shared.raw["generator"].adapters == ("generator_stage0", "generator")
    got = {"true": _step(shared_bb, shared), "false": _step(*_roles(name, "false", init=init))}
    fresh = _step(*_roles(name, "true"))
    torch.testing.assert_close(got["true"][0], got["false"][0], rtol=1e-4, atol=1e-7)
    assert not torch.allclose(fresh[0], got["false"][0], rtol=1e-4)
    for key, grad in got["false"][1].items():
        torch.testing.assert_close(got["true"][1][key], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()))


def _storage_bytes(roles) -> int:
    seen, total = set(), 0
    for net in (roles.teacher, *roles.raw.values()):
        for p in net.parameters():
            key = p.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += p.untyped_storage().nbytes()
    return total


def test_parameter_storage_is_one_base_not_three():
    _, shared = _roles("tiny_flux2", "true")
    _, separate = _roles("tiny_flux2", "false")
    base = sum(p.numel() * p.element_size() for n, p in separate.teacher.named_parameters())
    lora = sum(p.numel() * p.element_size() for r in ("generator", "fake_score") for p in separate.lora_params(r).values())
    assert isinstance(shared.teacher, RoleView) and shared.teacher.base is shared.raw["fake_score"].base
    assert _storage_bytes(separate) == 3 * base + lora
    assert _storage_bytes(shared) == base + lora
    assert len(shared.modules()) == 1 and len(separate.modules()) == 3


def test_generator_from_another_checkpoint_keeps_its_own_base(tmp_path):
    """``model.generator_init`` (another source): the generator is not shared; teacher and fake
    score still are."""
    from rtdmd.lora import lora_parameters

    params = load_params("tiny_flux2", TINY)
    ckpt = tmp_path / "gen.safetensors"
    from safetensors.torch import save_file

    net = build_backbone(params).load_transformer("teacher")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(ckpt))
    _, roles = _roles("tiny_flux2", "true", [f"model.generator_init={ckpt}"])
    assert not isinstance(roles.raw["generator"], RoleView)
    assert roles.raw["fake_score"].base is roles.teacher.base
    assert set(roles.lora_params("generator")) == set(lora_parameters(roles.raw["generator"]))


def test_shared_base_run_stops_and_resumes_exactly(tmp_path):
    """Optimizers, EMA and checkpoints are per role over the role's adapter only: a shared-base run
    stopped after one step and resumed equals the uninterrupted run, and exports both roles."""
    from rtdmd.lora.artifact import load_lora_artifact

    prompts = write_prompts(tmp_path / "p" / "train.txt")
    over = [f"cold_start.prompts={prompts}", "cold_start.global_batch_size=2", "model.resolution=32",
            "cold_start.eval_interval=0", "cold_start.checkpoint.save_interval=100", "cold_start.total_steps=2"]
    ref = make_trainer("tiny_flux2", tmp_path / "ref", over)
    ref.run()
    part = make_trainer("tiny_flux2", tmp_path / "part", over)
    part.opts.max_steps = 1
    assert part.run() is None
    rest = make_trainer("tiny_flux2", tmp_path / "part", over)
    rest.run()
    assert isinstance(rest.roles.raw["generator"], RoleView)
    for role in ("generator", "fake_score"):
        a, b = ref.roles.lora_state(role), rest.roles.lora_state(role)
        assert all(torch.equal(a[k], b[k]) for k in a), role
    art = load_lora_artifact(str(tmp_path / "part" / "artifact"))
    assert set(art.adapters["fake_score"].state) == set(ref.roles.lora_state("fake_score"))


def test_share_base_is_a_typed_option():
    from rtdmd.config.typed import ConfigError

    assert load_params("tiny_flux2").distributed.share_base is True
    with pytest.raises(Exception, match="share_base.*expected bool"):
        load_params("tiny_flux2", ["distributed.share_base=maybe"])
    with pytest.raises(ConfigError, match="did you mean 'share_base'"):
        load_params("tiny_flux2", ["distributed.share_bse=true"])
    assert load_params("tiny_flux2").distributed.fsdp_load == "meta"
    with pytest.raises(Exception, match="fsdp_load.*(meta|whole)"):
        load_params("tiny_flux2", ["distributed.fsdp_load=lazy"])
