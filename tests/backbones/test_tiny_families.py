"""Tiny FLUX.2-klein / SD3 / SD3.5 / FLUX.1 pipelines: build -> save -> reload through the real
``from_pretrained`` path of the adapters -> encode -> 4-step 32x32 rollout -> decode.

Also checks the adapters against the diffusers pipelines themselves (same weights, same noise,
the pipeline's own sigmas): the few-step Euler rollout of ``teacher_velocity`` must reproduce
the pipeline's final latents, which pins packing/patchifying, ids, timestep scaling, text
layer selection, CFG / guidance embedding and the VAE (un)normalisation.
"""
from __future__ import annotations

import math

import pytest
import torch

from rtdmd.algorithms.cps import cps_step
from rtdmd.backbones.base import Backbone, Cond
from rtdmd.config.schema import ModelCfg

KINDS = ["flux2", "sd3", "sd35", "flux1"]
FAMILY = {"flux2": "flux2_klein", "sd3": "sd3", "sd35": "sd3", "flux1": "flux1"}
STEPS = [1000, 750, 500, 250]
PROMPTS = ["a red cat on a table", "A photo of 3 dogs ~{}!"]


def backbone_cls(kind):
    if kind == "flux2":
        from rtdmd.backbones.flux2_klein import Flux2KleinBackbone as cls
    elif kind == "flux1":
        from rtdmd.backbones.flux1 import Flux1Backbone as cls
    else:
        from rtdmd.backbones.sd3 import SD3Backbone as cls
    return cls


def make_cfg(kind, path, **kw) -> ModelCfg:
    extra = {"text_encoder_out_layers": [1, 2, 3]} if kind == "flux2" else {}
    extra.update(kw)
    return ModelCfg(family=FAMILY[kind], pretrained=str(path), tiny=True, tiny_config=f"tiny_{kind}",
                    resolution=32, dtype="float32", max_sequence_length=16, **extra)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny pipeline per kind, built by the adapter itself (``model.tiny: true``) and cached."""
    cache = {}

    def get(kind):
        if kind not in cache:
            path = tmp_path_factory.mktemp("tiny") / kind
            bb = backbone_cls(kind)(make_cfg(kind, path), [], name=f"tiny_{kind}")
            cache[kind] = (path, bb, bb.load_transformer("teacher"))
        return cache[kind]

    return get


def rollout(bb, net, cond, seed, eta=0.9, teacher_scale=None, uncond=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bb.latent_shape(cond.batch_size), generator=g)
    sig = bb.sigmas(STEPS)
    for i in range(len(STEPS)):
        s = torch.full((x.shape[0],), sig[i])
        with torch.no_grad():
            if teacher_scale is None:
                v = bb.velocity(net, x, s, cond)
            else:
                v = bb.teacher_velocity(net, x, s, cond, uncond, teacher_scale)
        noise = torch.randn(x.shape, generator=g)
        x = cps_step(x, v, s, torch.full_like(s, sig[i + 1]), eta, noise=noise)
    return x


@pytest.mark.parametrize("kind", KINDS)
def test_encode_rollout_decode(built, kind):
    path, bb, net = built(kind)
    assert isinstance(bb, Backbone)
    assert (path / "model_index.json").is_file() and bb.family == FAMILY[kind]
    cond, uncond = bb.encode_prompts(PROMPTS), bb.empty_cond(2)
    assert set(cond.tensors) == set(uncond.tensors)
    for k, v in cond.tensors.items():
        assert v.shape[0] == 2 and uncond.tensors[k].shape == v.shape and v.dtype == torch.float32
        assert torch.isfinite(v).all()
    assert not torch.equal(cond.tensors["prompt_embeds"][0], cond.tensors["prompt_embeds"][1])
    assert torch.equal(bb.empty_cond(1).tensors["prompt_embeds"][0], bb.encode_prompts([""]).tensors["prompt_embeds"][0])
    sig = bb.sigmas(STEPS)
    assert len(sig) == 5 and sig[0] == pytest.approx(1.0) and sig[-1] == 0.0
    assert all(a > b for a, b in zip(sig, sig[1:]))
    x = rollout(bb, net, cond, seed=0)
    exp = {"flux2": (2, 16, 8, 8)}.get(kind, (2, 4, 16, 16))
    assert tuple(x.shape) == exp == bb.latent_shape(2)
    img = bb.decode(x)
    assert img.shape == (2, 3, 32, 32) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1 and torch.isfinite(img).all()


@pytest.mark.parametrize("kind", KINDS)
def test_rollout_is_deterministic_and_seed_dependent(built, kind):
    _, bb, net = built(kind)
    cond = bb.encode_prompts(PROMPTS)
    a, b, c = rollout(bb, net, cond, 3), rollout(bb, net, cond, 3), rollout(bb, net, cond, 4)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(bb.encode_prompts(PROMPTS).tensors["prompt_embeds"], cond.tensors["prompt_embeds"])


@pytest.mark.parametrize("kind", KINDS)
def test_decode_is_differentiable(built, kind):
    _, bb, _ = built(kind)
    x = (0.3 * torch.randn(bb.latent_shape(1), generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    img = bb.decode(x)
    img.mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in bb.vae.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_guidance_changes_prediction(built, kind):
    _, bb, net = built(kind)
    cond, uncond = bb.encode_prompts(PROMPTS), bb.empty_cond(2)
    x = torch.randn(bb.latent_shape(2), generator=torch.Generator().manual_seed(1))
    s = torch.tensor([0.9, 0.5])
    with torch.no_grad():
        v = bb.velocity(net, x, s, cond)
        v1 = bb.teacher_velocity(net, x, s, cond, uncond, 1.0)
        v4 = bb.teacher_velocity(net, x, s, cond, uncond, 4.0)
        vs = bb.velocity(net, x, 0.5, cond)  # python-float sigma broadcast to the batch
    assert v.shape == x.shape and torch.allclose(v, v1, atol=1e-6)
    assert (v4 - v1).abs().max() > 1e-4
    assert torch.allclose(vs[1], v[1], atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_roles_are_fresh_frozen_eval(built, kind):
    _, bb, teacher = built(kind)
    gen, fake = bb.load_transformer("generator"), bb.load_transformer("fake_score")
    for net in (teacher, gen, fake):
        assert not net.training and all(not p.requires_grad for p in net.parameters())
        assert next(net.parameters()).dtype == torch.float32
    assert gen is not teacher and fake is not teacher
    pg, pt = next(gen.parameters()), next(teacher.parameters())
    assert torch.equal(pg, pt) and pg.data_ptr() != pt.data_ptr()
    with pytest.raises(ValueError, match="role"):
        bb.load_transformer("critic")


def _linear_names(net):
    return [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]


SPEC_TARGETS = {
    "flux2": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
              "to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out"],
    "sd3": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_v_proj",
            "attn.add_q_proj", "attn.to_add_out"],
}


@pytest.mark.parametrize("kind", KINDS)
def test_lora_targets_match_linear_modules(built, kind):
    """Spec §10.1 targets (and the tiny params' list) all hit at least one Linear (peft suffix match)."""
    from rtdmd.config import load_params

    _, bb, net = built(kind)
    names = _linear_names(net)
    params_name = {"flux2": "tiny_flux2", "flux1": "tiny_flux1"}.get(kind, "tiny_sd3")
    targets = SPEC_TARGETS.get(kind, SPEC_TARGETS["sd3"]) + list(load_params(params_name).lora.targets)
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    assert unmatched == []


@pytest.mark.parametrize("kind", ["flux2", "sd3", "flux1"])
def test_rollout_with_lora(built, kind):
    """The same 4-step generation with a (non-zero) LoRA injected by ``rtdmd.lora``."""
    from rtdmd.lora import inject_lora

    _, bb, _ = built(kind)
    net = bb.load_transformer("generator")
    cond = bb.encode_prompts(PROMPTS)
    base = rollout(bb, net, cond, 5, eta=0.0)
    inject_lora(net, SPEC_TARGETS.get(kind, SPEC_TARGETS["sd3"]), rank=2, alpha=4)
    assert torch.equal(rollout(bb, net, cond, 5, eta=0.0), base)  # B = 0: identity at start
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    out = rollout(bb, net, cond, 5, eta=0.0)
    assert not torch.allclose(out, base) and bb.decode(out).shape == (2, 3, 32, 32)


def _pipeline(kind, path):
    import diffusers

    cls = {"flux2": diffusers.Flux2KleinPipeline, "flux1": diffusers.FluxPipeline}.get(
        kind, diffusers.StableDiffusion3Pipeline)
    return cls.from_pretrained(str(path), dtype=torch.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_diffusers_pipeline(built, kind):
    """Euler rollout with ``teacher_velocity`` over the pipeline's sigmas == the pipeline's latents."""
    from rtdmd.backbones.flux1 import pack
    from rtdmd.backbones.flux2_klein import patchify

    path, bb, net = built(kind)
    pipe = _pipeline(kind, path)
    scale, prompt = 3.0, PROMPTS[:1]
    x0 = torch.randn(bb.latent_shape(1), generator=torch.Generator().manual_seed(7))
    kw = dict(prompt=prompt, height=32, width=32, num_inference_steps=4, guidance_scale=scale,
              max_sequence_length=16, output_type="latent")
    if kind == "flux2":
        kw["text_encoder_out_layers"] = (1, 2, 3)
    with torch.no_grad():
        ref = pipe(latents=pack(x0) if kind == "flux1" else x0, **kw)[0]
        ref_img = pipe(latents=pack(x0) if kind == "flux1" else x0, **{**kw, "output_type": "pt"})[0]
    sig = pipe.scheduler.sigmas.tolist()
    assert len(sig) == 5 and sig[-1] == 0.0
    cond, uncond = bb.encode_prompts(prompt), bb.empty_cond(1)
    x = x0.clone()
    with torch.no_grad():
        for i in range(4):
            s = torch.full((1,), sig[i])
            x = cps_step(x, bb.teacher_velocity(net, x, s, cond, uncond, scale), s, torch.full((1,), sig[i + 1]), 0.0)
        img = bb.decode(x)
    mine = {"flux2": lambda: bb.unnormalize(x), "flux1": lambda: pack(x)}.get(kind, lambda: x)()
    assert ref.shape == mine.shape
    tol = 1e-4 * max(1.0, float(ref.abs().max()))
    assert torch.allclose(mine, ref, atol=tol, rtol=1e-4), float((mine - ref).abs().max())
    assert torch.allclose(img, ref_img.float(), atol=1e-4)
    if kind == "flux2":  # patchify/unpatchify and BN round trip
        assert torch.allclose(patchify(bb.unnormalize(x)), patchify(ref), atol=tol)


def test_sigma_quantisation_option_is_off_by_default(built):
    _, bb, net = built("flux2")
    cond = bb.encode_prompts(PROMPTS[:1])
    x = torch.randn(bb.latent_shape(1), generator=torch.Generator().manual_seed(2))
    s = torch.tensor([0.9581])
    with torch.no_grad():
        exact = bb.velocity(net, x, s, cond)
        bb.quantize_timestep = True
        try:
            quant = bb.velocity(net, x, s, cond)
            ref = bb.velocity(net, x, torch.tensor([0.96]), cond)  # bf16(958.1) = 960
        finally:
            bb.quantize_timestep = False
    assert torch.allclose(quant, ref, atol=1e-6) and not torch.allclose(exact, quant, atol=1e-6)
    assert math.isclose(float((torch.tensor(958.1).bfloat16()).float()), 960.0)


def test_cond_helpers_work_with_family_keys(built):
    _, bb, _ = built("sd3")
    c = bb.encode_prompts(PROMPTS)
    both = Cond.cat([bb.empty_cond(2), c])
    assert both.batch_size == 4 and both.repeat(2).batch_size == 8
    assert set(c.tensors) == {"prompt_embeds", "pooled"}


def test_flux2_token_ids_are_memoised_copies_of_the_definition():
    from rtdmd.backbones.flux2_klein import image_ids, text_ids, token_ids

    img, txt = token_ids(3, 5, 7, torch.device("cpu"))
    assert torch.equal(img, image_ids(3, 5, "cpu")) and torch.equal(txt, text_ids(7, "cpu"))
    assert token_ids(3, 5, 7, torch.device("cpu"))[0] is img  # the same tensors on the next forward
