"""Every LoRA artifact the project writes loads in the backbone's own diffusers pipeline.

For each tiny backbone (FLUX.2-klein, SD3, FLUX.1) and each artifact kind — a cold-start artifact
(generator + fake-score adapters), an RL artifact stacked on it (``parent`` link) and a reference
``.pt`` import — ``pipe.load_lora_weights(<artifact>/<role>)`` (active adapters, then
``fuse_lora``) must give the same transformer output as the project's own loader (the merged
stack of :func:`rtdmd.eval.variants.build_variant_net`, or PEFT injection + ``load_lora_state``).
"""
from __future__ import annotations

import hashlib

import pytest
import torch

from rtdmd.backbones import build_backbone
from rtdmd.config import load_params
from rtdmd.lora import inject_lora, load_lora_state, lora_state_dict, merge_lora_into_base
from rtdmd.lora.artifact import Adapter, load_lora_artifact, publish_lora_artifact, stack_chain
from rtdmd.lora.importer import import_reference

BACKBONES = {
    "tiny_flux2": ("Flux2KleinPipeline", ["model.text_encoder_out_layers=[1,2,3]"]),
    "tiny_sd3": ("StableDiffusion3Pipeline", []),
    "tiny_flux1": ("FluxPipeline", []),
}


def _randomised_state(net, params, seed: int) -> dict[str, torch.Tensor]:
    """A non-trivial adapter: A and B random (B = 0 would make every loader look right)."""
    inject_lora(net, params.lora.targets, params.lora.rank, params.lora.alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return lora_state_dict(net)


def _artifacts(params, bb, out):
    """cold_start (generator + fake_score), rl (parent = cold_start), imported (reference .pt)."""
    lc = params.lora
    adapters = {role: Adapter(_randomised_state(bb.load_transformer(role), params, seed), lc.rank, lc.alpha,
                              list(lc.targets)) for seed, role in enumerate(("generator", "fake_score"))}
    fields = {"backbone": params.name}
    publish_lora_artifact(str(out / "cold_start"), adapters, {**fields, "stage": "cold_start", "parent": None})
    sha = hashlib.sha256((out / "cold_start" / "manifest.json").read_bytes()).hexdigest()
    rl = {role: Adapter(_randomised_state(bb.load_transformer(role), params, 10 + i), lc.rank, lc.alpha,
                        list(lc.targets)) for i, role in enumerate(("generator", "fake_score"))}
    publish_lora_artifact(str(out / "rl"), rl, {**fields, "stage": "rl",
                                                "parent": {"uri": str(out / "cold_start"), "manifest_sha256": sha}})
    ref = {f"{k[:-len('.weight')]}.default.weight": v for k, v in
           _randomised_state(bb.load_transformer("generator"), params, 20).items()}
    torch.save(ref, out / "generator_ema.pt")
    import_reference([out / "generator_ema.pt"], params=params, out=str(out / "imported"), alpha=lc.alpha)
    return {kind: str(out / kind) for kind in ("cold_start", "rl", "imported")}


def _velocity(bb, net, cond, x, s):
    with torch.no_grad():
        return bb.velocity(net, x, s, cond)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BACKBONES))
def test_diffusers_load_lora_weights_matches_project_loader(tmp_path, name):
    import diffusers
    from rtdmd.eval.variants import Variant, build_variant_net, resolve_lora_stack

    pipe_cls, extra = BACKBONES[name]
    params = load_params(name, [f"model.pretrained={tmp_path / 'base'}", *extra])
    bb = build_backbone(params)
    arts = _artifacts(params, bb, tmp_path)
    cond = bb.encode_prompts(["a red cat on a table", "two dogs"])
    x = torch.randn(bb.latent_shape(2), generator=torch.Generator().manual_seed(3))
    s = torch.tensor([0.9, 0.4])
    base = _velocity(bb, bb.load_transformer("generator"), cond, x, s)
    pipe = getattr(diffusers, pipe_cls).from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    checked = 0
    for kind, uri in arts.items():
        chain = stack_chain(uri, backbone=name)
        for role in ("generator", "fake_score"):
            links = [a for a in chain if role in a.adapters]
            if not links:
                continue
            if role == "generator":  # the evaluation/inference loader: the parent chain merged in order
                stack = resolve_lora_stack([uri], params)
                mine = build_variant_net(bb, Variant(name=kind, kind="lora", step_list=[1000.0], eta=0.0, guidance=1.0, lora_uris=[uri]), stack)
            else:  # the training loader: the chain merged, the last adapter injected and loaded
                mine = bb.load_transformer(role)
                for art in links[:-1]:
                    merge_lora_into_base(mine, art.adapters[role].state, art.adapters[role].scale)
                inject_lora(mine, params.lora.targets, params.lora.rank, params.lora.alpha)
                load_lora_state(mine, links[-1].adapters[role].state)
            expected = _velocity(bb, mine, cond, x, s)
            assert (expected - base).abs().max() > 1e-3, f"{kind}/{role}: the LoRA changes nothing"

            names = [f"{kind}_{role}_{i}" for i in range(len(links))]
            for adapter_name, art in zip(names, links):
                pipe.load_lora_weights(str(art.path / role), adapter_name=adapter_name)
            pipe.set_adapters(names, [1.0] * len(names))
            tol = 1e-5 * max(1.0, float(expected.abs().max()))
            active = _velocity(bb, pipe.transformer, cond, x, s)
            assert torch.allclose(active, expected, atol=tol, rtol=1e-5), (kind, role, float((active - expected).abs().max()))
            pipe.fuse_lora(components=["transformer"], adapter_names=names)
            pipe.unload_lora_weights()  # keeps the fused weights, removes the LoRA layers
            fused = _velocity(bb, pipe.transformer, cond, x, s)
            assert torch.allclose(fused, expected, atol=tol, rtol=1e-5), (kind, role, float((fused - expected).abs().max()))
            pipe = getattr(diffusers, pipe_cls).from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
            checked += 1
    assert checked == 5  # cold_start x 2 roles, rl x 2 roles, imported generator
    # the artifact really is the one the project loads (not just a file diffusers happens to read)
    assert load_lora_artifact(arts["imported"], backbone=name).adapters["generator"].rank == params.lora.rank
