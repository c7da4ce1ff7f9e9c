"""Tiny random-weight pipelines for tests and the CPU demo (``tiny_flux2``, ``tiny_sd3``, ``tiny_flux1``).

:func:`build_tiny_pipeline` builds every component of a real pipeline from a small config
(values measured in ``spec/tiny_backbones.md``), trains the real tokenizer classes offline
(``train_new_from_iterator`` on the built-in prompts below, which include every printable ASCII
character), and writes the whole thing with ``save_pretrained`` in diffusers pipeline layout
(``model_index.json`` + one subfolder per component). The adapters then load it through exactly
the same ``from_pretrained`` calls as a hub id.

Kinds: ``flux2`` (Flux2KleinPipeline), ``sd3`` / ``sd35`` (StableDiffusion3Pipeline; sd35 adds
a dual-attention layer and RMS qk-norm), ``flux1`` (FluxPipeline). Builds are deterministic for
a seed (same bytes for the weights), take a few seconds, and :func:`ensure_tiny` builds into a
temporary sibling directory and renames it, so concurrent ranks never see a half-written model.

Departures from the real models: tiny widths/depths, a VAE with one down-sampling stage (spatial
factor 2 instead of 8), random FLUX.2 VAE BatchNorm statistics (so the decode un-normalisation
is exercised), 3 Qwen3 layers (use ``text_encoder_out_layers: [1, 2, 3]``), and a minimal Qwen
chat template (user/assistant turns, generation prompt, empty think block when
``enable_thinking`` is false) in place of Qwen3's full template. The trained tokenizers are
canonicalised (BPE alphabet ids sorted, Unigram scores rounded to 8 decimals and ties ordered)
because the ``tokenizers`` trainers are not byte-reproducible across processes.

CLI: ``python -m rtdmd.backbones.tiny --kind flux2 --out DIR [--seed 0]``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

KINDS = ("flux2", "sd3", "sd35", "flux1")
TOKENIZER_VOCAB = 480  # trained vocab (<= 512 = the text encoders' embedding rows)
ENCODER_VOCAB = 512

QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

_ADJ = ["red", "blue", "green", "small", "large", "shiny", "old", "wooden", "glass", "golden",
        "striped", "fluffy", "tiny", "ancient", "bright", "dark"]
_NOUN = ["cat", "dog", "car", "house", "tree", "robot", "bird", "boat", "cup", "clock",
         "flower", "mountain", "bicycle", "lamp", "horse", "apple"]
_SCENE = ["on a table", "in a forest", "at night", "under the sea", "in the snow",
          "next to a river", "in a city street", "on the moon"]


def tiny_prompts() -> list[str]:
    """A few hundred deterministic prompts plus every printable ASCII character."""
    out = [f"a {a} {n} {s}" for i, a in enumerate(_ADJ) for j, n in enumerate(_NOUN)
           for k, s in enumerate(_SCENE) if (i + 2 * j + 3 * k) % 5 == 0]
    out += [f"A photo of {i} {n}s, 4k, (high quality)!" for i, n in enumerate(_NOUN)]
    out += [string.printable, " ".join(string.printable), string.digits * 3, string.punctuation * 2]
    return out


def _kind(kind: str) -> str:
    k = kind.removeprefix("tiny_")
    if k not in KINDS:
        raise ValueError(f"unknown tiny kind {kind!r}; valid: {', '.join(KINDS)}")
    return k


def _canonical_model(model: dict, specials: set[str]) -> dict:
    """Make a trained tokenizer model byte-reproducible: the trainers assign alphabet ids in
    hash-map order (BPE) and produce last-bit-noisy scores and tie orders (Unigram)."""
    model = dict(model)
    if model["type"] == "BPE":
        vocab, merges = model["vocab"], model["merges"]
        pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in merges]
        fixed = sorted((i, t) for t, i in vocab.items() if t in specials)
        assert [i for i, _ in fixed] == list(range(len(fixed))), "special tokens must come first"
        produced = list(dict.fromkeys(a + b for a, b in pairs))
        rest = sorted(t for t in vocab if t not in specials and t not in set(produced))
        order = [t for _, t in fixed] + rest + [t for t in produced if t not in specials]
        assert sorted(order) == sorted(vocab), "unexpected BPE vocabulary layout"
        model["vocab"] = {t: i for i, t in enumerate(order)}
    elif model["type"] == "Unigram":
        entries = [(p, round(float(sc), 8)) for p, sc in model["vocab"]]
        head = [e for e in entries if e[0] in specials]
        tail = sorted((e for e in entries if e[0] not in specials), key=lambda e: (-e[1], e[0]))
        unk = entries[model["unk_id"]][0] if model.get("unk_id") is not None else None
        model["vocab"] = [list(e) for e in head + tail]
        if unk is not None:
            model["unk_id"] = [e[0] for e in head + tail].index(unk)
    return model


def _train(cls, base, **kw):
    """Train ``base`` on :func:`tiny_prompts`, canonicalise, reload through ``cls.from_pretrained``."""
    tok = base.train_new_from_iterator(tiny_prompts(), vocab_size=TOKENIZER_VOCAB, show_progress=False, **kw)
    for k, v in _TOKENIZER_ATTRS.get(cls.__name__, {}).items():
        setattr(tok, k, v)
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        path = Path(d) / "tokenizer.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        data["model"] = _canonical_model(data["model"], {t["content"] for t in data.get("added_tokens", [])})
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        return cls.from_pretrained(d)


_TOKENIZER_ATTRS = {
    "Qwen2Tokenizer": {"chat_template": QWEN_CHAT_TEMPLATE, "model_max_length": 512},
    "CLIPTokenizer": {"model_max_length": 77},
    "T5Tokenizer": {"model_max_length": 512},
}


def _tokenizers_qwen():
    from transformers import Qwen2Tokenizer

    base = Qwen2Tokenizer(eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    return _train(Qwen2Tokenizer, base, new_special_tokens=QWEN_SPECIALS)


def _tokenizer_clip():
    from transformers import CLIPTokenizer

    return _train(CLIPTokenizer, CLIPTokenizer())


def _tokenizer_t5():
    from transformers import T5Tokenizer

    return _train(T5Tokenizer, T5Tokenizer(extra_ids=0))


def _clip(tok, with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=ENCODER_VOCAB, hidden_size=16, intermediate_size=32, projection_dim=16,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def _t5(tok, seed: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=ENCODER_VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return T5EncoderModel(cfg).eval()


def _vae_kwargs() -> dict:
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                latent_channels=4, norm_num_groups=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False)


def _build_flux2(seed: int, transformer_overrides: dict | None = None):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = _tokenizers_qwen()
    cfg = Qwen3Config(vocab_size=ENCODER_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(cfg).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(**_vae_kwargs(), patch_size=(2, 2), mid_block_add_attention=True)
    g = torch.Generator().manual_seed(seed + 2)  # non-trivial BN statistics exercise the decode un-normalisation
    vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.num_features, generator=g))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.num_features, generator=g))
    torch.manual_seed(seed + 3)
    tcfg = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32,
                axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    tcfg.update(transformer_overrides or {})  # sized variants (benchmarks): width, depth, rope axes
    transformer = Flux2Transformer2DModel(**tcfg)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder, tokenizer=tok,
                              transformer=transformer.eval(), is_distilled=False)


def _build_sd3(seed: int, sd35: bool):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok_l, tok_g, tok_t5 = _tokenizer_clip(), _tokenizer_clip(), _tokenizer_t5()
    clip_l, clip_g, t5 = _clip(tok_l, True, seed), _clip(tok_g, True, seed + 1), _t5(tok_t5, seed + 2)
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(**_vae_kwargs(), scaling_factor=1.5, shift_factor=0.1)
    torch.manual_seed(seed + 4)
    extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if sd35 else {}
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=32, **extra)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=scheduler, vae=vae.eval(), text_encoder=clip_l, tokenizer=tok_l,
        text_encoder_2=clip_g, tokenizer_2=tok_g, text_encoder_3=t5, tokenizer_3=tok_t5)


def _build_flux1(seed: int):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok_clip, tok_t5 = _tokenizer_clip(), _tokenizer_t5()
    clip, t5 = _clip(tok_clip, False, seed), _t5(tok_t5, seed + 1)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**_vae_kwargs(), scaling_factor=0.4, shift_factor=0.1)
    torch.manual_seed(seed + 3)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=clip, tokenizer=tok_clip,
                        text_encoder_2=t5, tokenizer_2=tok_t5, transformer=transformer.eval())


def build_tiny_pipeline(kind: str, out_dir: str | os.PathLike, *, seed: int = 0,
                        transformer_overrides: dict | None = None) -> Path:
    """Build the tiny ``kind`` pipeline with seeded random weights and save it to ``out_dir``.

    ``transformer_overrides`` (``flux2`` only) replaces transformer config values, e.g.
    ``{"num_attention_heads": 8, "attention_head_dim": 64, "num_layers": 2, "num_single_layers": 4,
    "axes_dims_rope": (16, 16, 16, 16)}`` for a larger, compute-bound variant (benchmarks).
    """
    k = _kind(kind)
    out = Path(out_dir)
    if transformer_overrides and k != "flux2":
        raise ValueError("transformer_overrides is only supported for the flux2 tiny kind")
    with torch.random.fork_rng(devices=[]):
        if k == "flux2":
            pipe = _build_flux2(seed, transformer_overrides)
        elif k in ("sd3", "sd35"):
            pipe = _build_sd3(seed, sd35=(k == "sd35"))
        else:
            pipe = _build_flux1(seed)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def ensure_tiny(kind: str, out_dir: str | os.PathLike, *, seed: int = 0,
                transformer_overrides: dict | None = None) -> Path:
    """Build ``kind`` into ``out_dir`` unless ``out_dir/model_index.json`` exists (atomic rename)."""
    out = Path(os.path.expanduser(str(out_dir)))
    if (out / "model_index.json").is_file():
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists but holds no model_index.json; remove it or choose another model.pretrained")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build_tiny_pipeline(kind, tmp, seed=seed, transformer_overrides=transformer_overrides)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        try:
            os.replace(tmp, out)  # an empty existing `out` is replaced atomically
        except OSError:
            if not (out / "model_index.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m rtdmd.backbones.tiny", description=__doc__.splitlines()[0])
    ap.add_argument("--kind", required=True, choices=KINDS)
    ap.add_argument("--out", required=True, help="output directory (diffusers pipeline layout)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if OUT/model_index.json exists")
    a = ap.parse_args(argv)
    if a.force:
        out = build_tiny_pipeline(a.kind, a.out, seed=a.seed)
    else:
        out = ensure_tiny(a.kind, a.out, seed=a.seed)
    print(out)


if __name__ == "__main__":
    main()
