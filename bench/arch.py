"""Published architecture hyper-parameters of the real backbones, as facts, and what follows from
them: parameter counts, LoRA sizes, FLOPs per forward / forward+backward.

Configs cannot be downloaded here, so the numbers below are written down from the model cards /
diffusers configs as remembered; entries marked ``unsure`` are inferred (e.g. FLUX.2-klein
widths from the "4B"/"9B" totals and from ``joint_attention_dim = 3 × Qwen hidden``, which
``docs/tiny_backbones.md`` states). The single-block counts of klein (20 / 24) are confirmed by
the LoRA target lists of ``docs/method.md`` §10.1.

The models are instantiated from these configs **on the meta device** with the diffusers /
transformers classes the adapters use (no weights, no memory), so parameter counts and the
names/shapes of the adapted Linear layers come from the real module code; FLOPs are counted with
:class:`torch.utils.flop_counter.FlopCounterMode` on meta tensors (attention runs the math path
there and is counted as matmuls).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

# ---------------------------------------------------------------------------------------------
# facts
# ---------------------------------------------------------------------------------------------
from rtdmd.plan.facts import TEXT_ENCODERS, TRANSFORMERS, VAES  # noqa: E402,F401  (the facts live there)

# image tokens at resolution r: FLUX (both): (r/16)²; SD3: (r/8/2)² — both 1024 at 512 px
TOKEN_FACTOR = {"flux2_4b": 16, "flux2_9b": 16, "sd3m": 16, "sd35m": 16, "flux1_dev": 16}

# reward models of stage 2 (fp32 as loaded by rtdmd.rewards); parameter counts (millions),
# forward GFLOP per image at 224 px (2 · vision params · 257 tokens) and fp32 activations kept for
# back-propagation (layers · 15 · 257 · width · 4 B) — approximate published sizes, not built here
REWARDS = {
    "clipscore": {"model": "CLIP ViT-L/14", "params_m": 428, "gflop_fwd": 2 * 304 * 257 / 1e3,
                  "act_gb_per_image": 24 * 15 * 257 * 1024 * 4 / 1e9},
    "hpsv2": {"model": "OpenCLIP ViT-H/14", "params_m": 986, "gflop_fwd": 2 * 632 * 257 / 1e3,
              "act_gb_per_image": 32 * 15 * 257 * 1280 * 4 / 1e9},
    "pickscore": {"model": "CLIP ViT-H/14", "params_m": 986, "gflop_fwd": 2 * 632 * 257 / 1e3,
                  "act_gb_per_image": 32 * 15 * 257 * 1280 * 4 / 1e9},
    "geneval": {"model": "Mask2Former Swin-S + CLIP ViT-L/14", "params_m": 69 + 428, "gflop_fwd": 300.0},
}
BP_REWARDS = ("clipscore", "hpsv2", "pickscore")


# ---------------------------------------------------------------------------------------------
# meta-device models
# ---------------------------------------------------------------------------------------------
def _cls(name: str):
    import diffusers
    import transformers

    return getattr(diffusers, name, None) or getattr(transformers, name)


def meta_transformer(key: str):
    import torch

    spec = TRANSFORMERS[key]
    with torch.device("meta"):
        return _cls(spec["cls"])(**spec["cfg"])


def meta_text_encoder(spec: dict):
    import torch
    import transformers

    cfg_cls = {"Qwen3Model": transformers.Qwen3Config, "CLIPTextModelWithProjection": transformers.CLIPTextConfig,
               "CLIPTextModel": transformers.CLIPTextConfig, "T5EncoderModel": transformers.T5Config}[spec["cls"]]
    with torch.device("meta"):
        return getattr(transformers, spec["cls"])(cfg_cls(**spec["cfg"]))


def meta_vae(key: str):
    import torch

    spec = VAES[key]
    with torch.device("meta"):
        return _cls(spec["cls"])(**spec["cfg"])


def nparams(module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_layers(module, targets: list[str]) -> list[tuple[str, int, int]]:
    """``(name, in, out)`` of every Linear a PEFT suffix match of ``targets`` adapts."""
    from torch import nn

    out = []
    for name, mod in module.named_modules():
        if isinstance(mod, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            out.append((name, mod.in_features, mod.out_features))
    return out


def lora_numel(module, targets: list[str], rank: int) -> int:
    """``Σ r·(in + out)`` over the adapted Linear layers."""
    return sum(rank * (i + o) for _, i, o in lora_layers(module, targets))


# ---------------------------------------------------------------------------------------------
# FLOPs (meta tensors)
# ---------------------------------------------------------------------------------------------
def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def transformer_inputs(key: str, batch: int, resolution: int, text_tokens: int):
    import torch

    cfg = TRANSFORMERS[key]["cfg"]
    g = resolution // TOKEN_FACTOR[key]
    with torch.device("meta"):
        if key.startswith("flux2"):
            return dict(hidden_states=torch.randn(batch, g * g, cfg["in_channels"]),
                        encoder_hidden_states=torch.randn(batch, text_tokens, cfg["joint_attention_dim"]),
                        timestep=torch.rand(batch), img_ids=torch.zeros(g * g, 4), txt_ids=torch.zeros(text_tokens, 4),
                        return_dict=False)
        if key == "flux1_dev":
            return dict(hidden_states=torch.randn(batch, g * g, cfg["in_channels"]),
                        encoder_hidden_states=torch.randn(batch, text_tokens, cfg["joint_attention_dim"]),
                        pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"]),
                        timestep=torch.rand(batch), img_ids=torch.zeros(g * g, 3), txt_ids=torch.zeros(text_tokens, 3),
                        guidance=torch.ones(batch), return_dict=False)
        lat = resolution // 8
        return dict(hidden_states=torch.randn(batch, cfg["in_channels"], lat, lat),
                    encoder_hidden_states=torch.randn(batch, text_tokens, cfg["joint_attention_dim"]),
                    pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"]),
                    timestep=torch.rand(batch) * 1000, return_dict=False)


def text_tokens(key: str) -> int:
    encs = TEXT_ENCODERS[key]
    if key in ("sd3m", "sd35m"):
        return 77 + encs[-1]["tokens"]  # CLIP (77, padded to T5 width) + T5 tokens
    if key == "flux1_dev":
        return encs[-1]["tokens"]
    return encs[0]["tokens"]


@lru_cache(maxsize=None)
def transformer_costs(key: str, resolution: int, lora_rank: int, targets: tuple[str, ...]) -> dict[str, float]:
    """Forward and LoRA forward+backward FLOPs of one sample; params; LoRA numel."""
    import torch

    from rtdmd.lora import inject_lora, lora_parameters

    from torch import nn

    net = meta_transformer(key)
    n = nparams(net)
    kw = transformer_inputs(key, 1, resolution, text_tokens(key))
    blocks = [b for child in net.children() if isinstance(child, nn.ModuleList) for b in child]
    act = [0]

    def fwd_run():
        act[0] = _leaf_output_numel(nn.ModuleList(blocks), lambda: net(**kw))
    fwd = _flops(fwd_run)
    lora_suffix = lora_numel(net, list(targets), lora_rank)
    with torch.device("meta"):
        inject_lora(net, list(targets), lora_rank, 2 * lora_rank)
    lora = sum(p.numel() for p in lora_parameters(net).values())
    assert lora == lora_suffix, (lora, lora_suffix)  # PEFT's match == the suffix rule used for artifact sizes
    for p in net.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(net).values():
        p.requires_grad_(True)

    def fb():
        out = net(**kw)[0]
        out.sum().backward()
    fwd_bwd = _flops(fb)
    s_tok = (resolution // TOKEN_FACTOR[key]) ** 2 + text_tokens(key)
    width = TRANSFORMERS[key]["cfg"]["num_attention_heads"] * TRANSFORMERS[key]["cfg"]["attention_head_dim"]
    profile = {"act_elems_all_blocks": act[0], "blocks": len(blocks), "tokens": s_tok, "width": width,
               "block_input_elems": s_tok * width, "max_block_params": max(nparams(b) for b in blocks) if blocks else 0,
               "act_per_token_width": act[0] / max(1, len(blocks)) / (s_tok * width)}
    return {"params": n, "lora_numel": lora, "fwd_flops": fwd, "fwd_bwd_flops": fwd_bwd, "profile": profile,
            "image_tokens": (resolution // TOKEN_FACTOR[key]) ** 2, "text_tokens": text_tokens(key),
            "blocks": TRANSFORMERS[key]["cfg"]["num_layers"] + TRANSFORMERS[key]["cfg"].get("num_single_layers", 0),
            "width": TRANSFORMERS[key]["cfg"]["num_attention_heads"] * TRANSFORMERS[key]["cfg"]["attention_head_dim"]}


@lru_cache(maxsize=None)
def text_costs(key: str) -> dict[str, float]:
    """Parameters and forward FLOPs (one prompt) of the text encoders (2·params·tokens: the
    embedding lookup does no FLOPs, attention adds ~4·L²·d per layer)."""
    total_p, total_f = 0, 0
    for spec in TEXT_ENCODERS[key]:
        m = meta_text_encoder(spec)
        p = nparams(m)
        emb = 0
        for mod in m.modules():
            import torch

            if isinstance(mod, torch.nn.Embedding):
                emb += mod.weight.numel()
        L = spec["tokens"]
        cfg = spec["cfg"]
        d = cfg.get("hidden_size", cfg.get("d_model"))
        layers = cfg.get("num_hidden_layers", cfg.get("num_layers"))
        total_p += p
        total_f += 2 * (p - emb) * L + 4 * L * L * d * layers
    return {"params": total_p, "fwd_flops": total_f}


@lru_cache(maxsize=None)
def vae_costs(key: str, resolution: int) -> dict[str, float]:
    import torch

    vae = meta_vae(key)
    f = VAES[key]["factor"]
    c = VAES[key]["cfg"]["latent_channels"]
    with torch.device("meta"):
        z = torch.randn(1, c, resolution // f, resolution // f)
    act = [0]

    def run():
        act[0] = _leaf_output_numel(vae.decoder, lambda: vae.decode(z))
    dec = _flops(run)
    return {"params": nparams(vae), "decoder_params": nparams(vae.decoder), "decode_flops": dec,
            "decode_act_elems": act[0]}


def lora_bytes_flux2_4b(rank: int = 32, targets: list[str] | None = None, dtype_bytes: int = 4) -> dict[str, Any]:
    """Byte size of one rank-``rank`` LoRA adapter on the real FLUX.2-klein 4B targets (fp32)."""
    if targets is None:
        from rtdmd.config import load_params

        targets = list(load_params("flux2_4b").lora.targets)
    net = meta_transformer("flux2_4b")
    layers = lora_layers(net, targets)
    numel = sum(rank * (i + o) for _, i, o in layers)
    return {"layers": len(layers), "numel": numel, "bytes": numel * dtype_bytes, "rank": rank, "targets": targets,
            "shapes": sorted({(i, o) for _, i, o in layers})}


# ---------------------------------------------------------------------------------------------
# activation estimates (meta tensors): Σ of leaf-module output sizes, a rough proxy for what
# autograd keeps for backward (flash attention assumed: no L² attention matrix is kept)
# ---------------------------------------------------------------------------------------------
def _leaf_output_numel(module, run) -> int:
    total = [0]
    handles = []

    def hook(mod, inp, out):
        import torch

        if isinstance(out, torch.Tensor):
            total[0] += out.numel()
        elif isinstance(out, (tuple, list)):
            total[0] += sum(o.numel() for o in out if isinstance(o, torch.Tensor))

    for m in module.modules():
        if not list(m.children()):
            handles.append(m.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return total[0]


def activation_profile(key: str, resolution: int, lora_rank: int, targets: tuple[str, ...]) -> dict[str, float]:
    """Per-sample activation elements of the transformer blocks and block sizes (meta run)."""
    return transformer_costs(key, resolution, lora_rank, targets)["profile"]


def vae_decode_activation_elems(key: str, resolution: int) -> int:
    return vae_costs(key, resolution)["decode_act_elems"]
