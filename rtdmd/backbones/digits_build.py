r"""Build the ``digits`` pipeline: a small FLUX.2-klein trained here on the scikit-learn digits.

Two steps (DVC stages ``digits_vae`` and ``digits_teacher``), each deterministic for its seed:

1. **VAE** (``AutoencoderKLFlux2``, one down-sampling stage, 4 latent channels): trained on all
   digits (16 px RGB, in the VAE's [-1, 1] range) with the loss
   ``‖D(z) − x‖² + β_KL · KL(q(z|x) ‖ N(0, I))``, ``z ~ q(z|x)``. Then the BatchNorm the FLUX.2
   pipeline applies to the 2×2-patchified latent gets the *exact* per-channel mean and variance of
   the patchified posterior means of the whole data set (the adapter un-normalises with them).
   The reconstruction MSE (pixels in [0, 1]) on every image is written to ``metrics.json``.
2. **Text encoder + teacher**: the real Qwen3 tokenizer class trained offline on the digit
   prompts (BPE, canonicalised as in :mod:`rtdmd.backbones.tiny`), a frozen random-weight
   ``Qwen3ForCausalLM`` (3 layers; the adapter concatenates the hidden states of layers 1–3), and
   a ``Flux2Transformer2DModel`` trained by rectified flow matching (spec §1.1) on the
   BN-normalised patchified latents ``x0``: ``x_σ = (1 − σ) x0 + σ ε``, target ``ε − x0``,
   ``σ ~ U(0, 1)``; the prompt (a random phrasing of the label) is replaced by the empty prompt
   with probability ``prompt_dropout`` so CFG works. AdamW with cosine decay; the EMA of the
   weights (``ema_decay``) is what is saved.

The whole thing is written with ``Flux2KleinPipeline.save_pretrained`` plus ``digits.json``
(what was built, the training settings and CPU seconds), so
:class:`rtdmd.backbones.flux2_klein.Flux2KleinBackbone` loads it exactly like a hub checkpoint.

CLI: ``python -m rtdmd.backbones.digits_build {vae,teacher} --out DIR [--vae DIR] [--params FILE]``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import string
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rtdmd.backbones.digits_data import NUM_CLASSES, PHRASINGS, all_prompts, load_images, prompt_for
from rtdmd.backbones.flux2_klein import patchify

MARKER = "digits.json"
QWEN_HIDDEN = 16
OUT_LAYERS = (1, 2, 3)


@dataclass
class VaeTrainCfg:
    resolution: int = 16
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32])
    latent_channels: int = 4
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    kl_weight: float = 1e-4
    seed: int = 0


@dataclass
class TeacherTrainCfg:
    num_layers: int = 2
    num_single_layers: int = 2
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    max_sequence_length: int = 32
    steps: int = 2500
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    prompt_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0


@dataclass
class BuildCfg:
    vae: VaeTrainCfg = field(default_factory=VaeTrainCfg)
    teacher: TeacherTrainCfg = field(default_factory=TeacherTrainCfg)


# ----------------------------------------------------------------------------- VAE
def make_vae(cfg: VaeTrainCfg):
    from diffusers import AutoencoderKLFlux2

    n = len(cfg.block_out_channels)
    return AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=1, latent_channels=cfg.latent_channels, norm_num_groups=8,
        sample_size=cfg.resolution, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False, patch_size=(2, 2))


@torch.no_grad()
def encode_mean(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means of ``images`` in [0, 1] (raw, un-patchified latents)."""
    return torch.cat([vae.encode(images[i:i + batch] * 2 - 1).latent_dist.mode()
                      for i in range(0, images.shape[0], batch)])


def normalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """Raw latent -> the BN-normalised patchified latent the adapter works on (inverse of its
    ``unnormalize``)."""
    p = patchify(z)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return (p - mean) / std


def fit_vae(cfg: VaeTrainCfg, images: torch.Tensor):
    """The optimisation part of :func:`train_vae` (BN statistics not yet set)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    vae = make_vae(cfg)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    for _ in range(cfg.steps):
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen)
        x = images[idx] * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = ((rec - x) ** 2).mean() + cfg.kl_weight * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return vae.eval()


def train_vae(cfg: VaeTrainCfg):
    images, _ = load_images(cfg.resolution)
    vae = fit_vae(cfg, images)
    z = encode_mean(vae, images)
    p = patchify(z)
    vae.bn.running_mean.copy_(p.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(p.var(dim=(0, 2, 3), unbiased=False))
    with torch.no_grad():
        rec = torch.cat([(vae.decode(z[i:i + 256]).sample / 2 + 0.5).clamp(0, 1) for i in range(0, z.shape[0], 256)])
    mse = float(((rec - images) ** 2).mean())
    return vae, {"recon_mse": mse, "recon_psnr_db": 10 * math.log10(1.0 / max(mse, 1e-12))}


# ----------------------------------------------------------------------------- text
def make_tokenizer():
    """The Qwen3 tokenizer class, BPE-trained offline on the digit prompts (+ printable ASCII)."""
    from transformers import Qwen2Tokenizer

    from rtdmd.backbones.tiny import QWEN_CHAT_TEMPLATE, QWEN_SPECIALS, _canonical_model

    chat = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    corpus = [chat.format(p) for p in all_prompts()] * 4 + [string.printable, " ".join(string.printable)]
    base = Qwen2Tokenizer(eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    tok = base.train_new_from_iterator(corpus, vocab_size=480, show_progress=False, new_special_tokens=QWEN_SPECIALS)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.model_max_length = 512
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        path = Path(d) / "tokenizer.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        data["model"] = _canonical_model(data["model"], {t["content"] for t in data.get("added_tokens", [])})
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        return Qwen2Tokenizer.from_pretrained(d)


def make_text_encoder(tok, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=512, hidden_size=QWEN_HIDDEN, intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).eval()


@torch.no_grad()
def encode_texts(tok, text_encoder, prompts: list[str], max_len: int) -> torch.Tensor:
    """Exactly the adapter's text path (chat template, pad to ``max_len``, layers 1–3 stacked)."""
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                     enable_thinking=False) for p in prompts]
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    out = text_encoder.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             output_hidden_states=True, use_cache=False)
    return torch.cat([out.hidden_states[k] for k in OUT_LAYERS], dim=-1)


def prompt_token_count(tok, prompt: str) -> int:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
                                   enable_thinking=False)
    return len(tok(text)["input_ids"])


# ----------------------------------------------------------------------------- teacher
def make_transformer(cfg: TeacherTrainCfg, in_channels: int):
    from diffusers import Flux2Transformer2DModel

    d = cfg.attention_head_dim
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=cfg.num_layers, num_single_layers=cfg.num_single_layers,
        attention_head_dim=d, num_attention_heads=cfg.num_attention_heads, joint_attention_dim=3 * QWEN_HIDDEN,
        timestep_guidance_channels=64, axes_dims_rope=(d // 4,) * 4, guidance_embeds=False)


def _velocity(net, x: torch.Tensor, sigma: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    from rtdmd.backbones.flux2_klein import image_ids, text_ids

    b, c, h, w = x.shape
    out = net(hidden_states=x.reshape(b, c, h * w).transpose(1, 2), encoder_hidden_states=emb, timestep=sigma,
              img_ids=image_ids(h, w, x.device), txt_ids=text_ids(emb.shape[1], x.device), guidance=None,
              return_dict=False)[0]
    return out[:, : h * w].transpose(1, 2).reshape(b, c, h, w)


def train_teacher(cfg: TeacherTrainCfg, x0: torch.Tensor, labels: torch.Tensor, table: torch.Tensor,
                  empty: torch.Tensor):
    """Flow matching on ``x0`` ``[N, C, h, w]``; ``table[c, p]`` = embedding of class c, phrasing p."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    net = make_transformer(cfg, x0.shape[1])
    net.train()
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    for _ in range(cfg.steps):
        idx = torch.randint(0, x0.shape[0], (cfg.batch_size,), generator=gen)
        x = x0[idx]
        phr = torch.randint(0, table.shape[1], (cfg.batch_size,), generator=gen)
        emb = table[labels[idx], phr]
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.prompt_dropout
        emb = torch.where(drop[:, None, None], empty.expand_as(emb), emb)
        eps = torch.randn(x.shape, generator=gen)
        sigma = torch.rand(cfg.batch_size, generator=gen)
        xs = (1 - sigma.view(-1, 1, 1, 1)) * x + sigma.view(-1, 1, 1, 1) * eps
        loss = ((_velocity(net, xs, sigma, emb) - (eps - x)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1 - cfg.ema_decay)
    return ema.eval(), float(loss.detach())


# ----------------------------------------------------------------------------- stages
def load_cfg(path: str | None) -> BuildCfg:
    from rtdmd.config.typed import from_mapping, load_yaml

    if path is None:
        return BuildCfg()
    return from_mapping(BuildCfg, load_yaml(path), source=str(path))


def build_vae(out: str | Path, cfg: VaeTrainCfg) -> dict:
    from rtdmd.artifacts.fs import atomic_dir

    t0 = time.process_time()
    w0 = time.time()
    with torch.random.fork_rng(devices=[]):
        vae, metrics = train_vae(cfg)
    info = {"vae": asdict(cfg), "metrics": metrics, "cpu_seconds": time.process_time() - t0,
            "wall_seconds": time.time() - w0, "torch_threads": torch.get_num_threads()}
    with atomic_dir(out) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        (tmp / "metrics.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return info


def build_pipeline(out: str | Path, vae_dir: str | Path, cfg: TeacherTrainCfg) -> dict:
    """Train the teacher on the latents of the VAE at ``vae_dir``; save the full pipeline."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    from rtdmd.artifacts.fs import atomic_dir

    t0, w0 = time.process_time(), time.time()
    vae = AutoencoderKLFlux2.from_pretrained(str(vae_dir)).eval()
    vae_info = json.loads((Path(vae_dir) / "metrics.json").read_text())
    res = int(vae_info["vae"]["resolution"])
    with torch.random.fork_rng(devices=[]):
        tok = make_tokenizer()
        longest = max(prompt_token_count(tok, p) for p in all_prompts())
        if longest > cfg.max_sequence_length:
            raise ValueError(f"teacher.max_sequence_length {cfg.max_sequence_length} truncates the digit prompts "
                             f"(the longest needs {longest} tokens)")
        text_encoder = make_text_encoder(tok, cfg.seed)
        prompts = [prompt_for(c, p) for c in range(NUM_CLASSES) for p in range(len(PHRASINGS))]
        table = encode_texts(tok, text_encoder, prompts, cfg.max_sequence_length)
        table = table.view(NUM_CLASSES, len(PHRASINGS), *table.shape[1:])
        empty = encode_texts(tok, text_encoder, [""], cfg.max_sequence_length)
        images, labels = load_images(res)
        with torch.no_grad():
            x0 = normalize_latents(vae, encode_mean(vae, images))
        teacher, last_loss = train_teacher(cfg, x0, labels, table, empty)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                              transformer=teacher, is_distilled=False)
    info = {"kind": "digits", "resolution": res, "max_sequence_length": cfg.max_sequence_length,
            "text_encoder_out_layers": list(OUT_LAYERS), "longest_prompt_tokens": longest,
            "teacher": asdict(cfg), "vae": vae_info, "teacher_last_loss": last_loss,
            "transformer_params": sum(p.numel() for p in teacher.parameters()),
            "cpu_seconds": time.process_time() - t0, "wall_seconds": time.time() - w0,
            "torch_threads": torch.get_num_threads()}
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True))
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rtdmd.backbones.digits_build", description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("vae", "teacher"))
    ap.add_argument("--out", required=True, help="output directory (written atomically)")
    ap.add_argument("--vae", default="data/digits/vae", help="trained VAE directory (for 'teacher')")
    ap.add_argument("--params", default="params/digits_build.yaml", help="YAML with 'vae' and 'teacher' sections")
    ap.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    a = ap.parse_args(argv)
    from rtdmd.config.typed import ConfigError

    try:
        cfg = load_cfg(a.params)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if Path(a.out).exists() and any(Path(a.out).iterdir()) and not a.force:
        print(f"error: {a.out} exists; pass --force to rebuild it", file=sys.stderr)
        return 2
    if a.what == "vae":
        info = build_vae(a.out, cfg.vae)
    else:
        if not (Path(a.vae) / "metrics.json").is_file():
            print(f"error: --vae {a.vae} holds no trained digits VAE; run `dvc repro digits_vae` first", file=sys.stderr)
            return 2
        info = build_pipeline(a.out, a.vae, cfg.teacher)
    print(json.dumps({k: v for k, v in info.items() if k in ("metrics", "cpu_seconds", "wall_seconds",
                                                           "teacher_last_loss", "transformer_params")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
