"""Tiny random-weight reward checkpoints in the real on-disk layout (see :mod:`rtdmd.rewards.ckpt`).

``build_tiny_reward_checkpoints(out_dir, names=None, seed=0)`` writes, for the
requested rewards (default: every neural reward —
``pickscore``, ``clipscore``, ``aesthetic``, ``hpsv2``, ``geneval``, ``geneval2``, ``imagereward``, ``hpsv3``):

* HF ``save_pretrained`` directories (tiny ``CLIPModel`` + ``CLIPProcessor`` with an
  offline byte-level CLIP tokenizer; tiny Mask2Former with a Swin backbone + its
  image processor);
* open_clip weights as ``torch.save`` of plain tensor dicts, with the custom
  architecture JSON next to them;
* the aesthetic MLP ``.pth`` state_dict (input width = the tiny CLIP projection);
* a tiny Qwen3-VL judge (``Qwen3VLForConditionalGeneration`` + ``Qwen3VLProcessor`` with a
  byte-level tokenizer and a minimal Qwen chat template) for GenEval2.

* ImageReward: ``ImageReward/ImageReward.pt`` (a tiny BLIP ViT + cross-attention BERT + MLP with the
  published key names), ``med_config.json`` (plus an ``rtdmd_vision`` entry for the tiny ViT) and a
  ``bert-base-uncased/`` WordPiece tokenizer over ASCII characters;
* HPSv3: ``hpsv3/`` with a tiny Qwen2-VL ``config.json``, a Qwen2-VL processor (byte-level tokenizer,
  minimal chat template, patch 14 / merge 2 like the real one) and ``HPSv3.safetensors`` in the
  published key layout (``visual.*``, ``model.*``, ``lm_head.weight``, ``rm_head.*``).

The scorers are then built from that directory by the **real** loaders (the native backends for
``imagereward`` and ``hpsv3``). Output is deterministic for a seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

TINY_NAMES = ("pickscore", "clipscore", "aesthetic", "hpsv2", "geneval", "geneval2", "imagereward", "hpsv3")

TINY_PROJECTION_DIM = 16
TINY_CLIP_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=77)
TINY_CLIP_VISION = dict(image_size=224, patch_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2)
TINY_OPEN_CLIP_HPS = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 16, "head_width": 8, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
TINY_OPEN_CLIP_COLOUR = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte -> printable unicode table (the base alphabet of byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    bs, cs, n = keep[:], keep[:], 0
    for b in range(256):
        if b not in keep:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer():
    """A 514-token byte-level CLIP tokenizer (every byte, with and without ``</w>``; no merges)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    chars = _bytes_to_unicode()
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip(seed: int, tokenizer, logit_scale: float = 4.6052):
    from transformers import CLIPConfig, CLIPModel

    text = dict(TINY_CLIP_TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg = CLIPConfig(text_config=text, vision_config=dict(TINY_CLIP_VISION), projection_dim=TINY_PROJECTION_DIM,
                     logit_scale_init_value=logit_scale)
    torch.manual_seed(seed)
    return CLIPModel(cfg).eval()


def _clip_processor(tokenizer):
    from transformers import CLIPImageProcessor, CLIPProcessor

    return CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer)


def _save_clip_processor(tokenizer, d: Path) -> None:
    proc = _clip_processor(tokenizer)
    proc.save_pretrained(d)
    proc.image_processor.save_pretrained(d)  # preprocessor_config.json, as in the hub repos


def _save_open_clip(model_cfg: dict, name: str, seed: int, cfg_path: Path, weight_paths: list[tuple[Path, str | None]]):
    from . import _openclip as OC

    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps({"model_name": name, "model_cfg": model_cfg}, indent=2))
    arch = OC.register_arch(cfg_path, "tiny")
    for i, (path, key) in enumerate(weight_paths):
        torch.manual_seed(seed + i)
        model = OC.create_model(arch, "tiny")
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        torch.save({key: sd} if key else sd, path)


def _build_pickscore(out: Path, seed: int) -> None:
    tok = tiny_clip_tokenizer()
    tiny_clip(seed, tok).save_pretrained(out / "PickScore_v1")
    _save_clip_processor(tok, out / "CLIP-ViT-H-14-laion2B-s32B-b79K")


def _build_clip_l14(out: Path, seed: int) -> None:
    d = out / "clip-vit-large-patch14"
    if (d / "config.json").is_file():
        return
    tok = tiny_clip_tokenizer()
    tiny_clip(seed + 1, tok).save_pretrained(d)
    _save_clip_processor(tok, d)


def _build_aesthetic(out: Path, seed: int) -> None:
    from .aesthetic import MLP_FILE, AestheticMLP

    _build_clip_l14(out, seed)
    torch.manual_seed(seed + 2)
    mlp = AestheticMLP((TINY_PROJECTION_DIM, 1024, 128, 64, 16, 1))
    torch.save({k: v.clone() for k, v in mlp.state_dict().items()}, out / MLP_FILE)


def _build_hpsv2(out: Path, seed: int, model_cfg: dict = TINY_OPEN_CLIP_HPS) -> None:
    from .hpsv2 import ARCH_FILE, BASE_FILE, HPS_FILE

    _save_open_clip(model_cfg, "rtdmd-tiny-hpsv2", seed + 3, out / ARCH_FILE,
                    [(out / BASE_FILE, None), (out / HPS_FILE, "state_dict")])


COCO_TINY_IMAGE = {"shortest_edge": 64, "longest_edge": 96}


def tiny_mask2former(seed: int):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    from .geneval import object_names

    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    names = object_names()
    cfg = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                            encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                            dim_feedforward=32, num_queries=8, id2label=dict(enumerate(names)),
                            label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(seed)
    return Mask2FormerForUniversalSegmentation(cfg).eval()


def _build_geneval(out: Path, seed: int) -> None:
    from transformers import Mask2FormerImageProcessor

    from .geneval import COLOUR_DIR, MASK2FORMER_DIR

    d = out / MASK2FORMER_DIR
    tiny_mask2former(seed + 4).save_pretrained(d)
    Mask2FormerImageProcessor(size=dict(COCO_TINY_IMAGE), size_divisor=32, num_labels=80).save_pretrained(d)
    cd = out / COLOUR_DIR
    _save_open_clip(TINY_OPEN_CLIP_COLOUR, "rtdmd-tiny-colour-clip", seed + 5, cd / "open_clip_config.json",
                    [(cd / "open_clip_pytorch_model.bin", None)])


QWEN_SPECIALS = ("<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
#: A minimal Qwen chat template: image entries become <|vision_start|><|image_pad|><|vision_end|>.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_qwen3_vl(seed: int):
    """(model, processor): a ~60k-parameter Qwen3-VL with a byte-level tokenizer and a 64×64 pixel budget."""
    from transformers import Qwen2Tokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS)})
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN_SPECIALS}
    ip = Qwen2VLImageProcessor(size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}, patch_size=16,
                               temporal_patch_size=2, merge_size=2)
    video = None
    try:
        from transformers import Qwen3VLVideoProcessor

        video = Qwen3VLVideoProcessor()
    except Exception:  # pragma: no cover - video processing is not used
        pass
    proc = Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=video, chat_template=QWEN_CHAT_TEMPLATE)
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, proc


def _build_geneval2(out: Path, seed: int) -> None:
    d = out / "geneval2" / "Qwen3-VL-8B-Instruct"
    model, proc = tiny_qwen3_vl(seed + 6)
    model.save_pretrained(d)
    proc.save_pretrained(d)


TINY_BLIP_VISION = dict(image_size=224, patch_size=16, width=32, depth=2, heads=2, mlp_dim=64)
TINY_BLIP_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=64, layer_norm_eps=1e-12)


def tiny_bert_tokenizer():
    """A 141-token uncased WordPiece tokenizer: BERT specials + every ASCII letter/digit/punctuation, and
    their ``##`` continuations (any lower-cased ASCII word is spelled out character by character)."""
    import string

    from transformers import BertTokenizer

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True), vocab


def _build_imagereward(out: Path, seed: int, vision: dict = TINY_BLIP_VISION, text: dict = TINY_BLIP_TEXT) -> None:
    """``ImageReward/{ImageReward.pt, med_config.json, bert-base-uncased/}`` with a tiny BLIP."""
    from ._blip import ImageRewardNet, configs_from_med
    from .imagereward import BLIP_EXTRA_TOKENS, CKPT_SUBDIR, REWARD_MEAN, REWARD_STD, TOKENIZER_DIR

    d = out / CKPT_SUBDIR
    tok, vocab = tiny_bert_tokenizer()
    tok.save_pretrained(d / TOKENIZER_DIR)
    (d / TOKENIZER_DIR / "vocab.txt").write_text("\n".join(vocab) + "\n")
    med = {"architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
           "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02, "pad_token_id": 0, "type_vocab_size": 2,
           **text, "vocab_size": len(vocab) + len(BLIP_EXTRA_TOKENS),
           "encoder_width": vision["width"], "add_cross_attention": True,
           "rtdmd_vision": dict(vision)}
    (d / "med_config.json").write_text(json.dumps(med, indent=2))
    torch.manual_seed(seed + 7)
    net = ImageRewardNet(*configs_from_med(med), REWARD_MEAN, REWARD_STD)
    with torch.no_grad():
        for p in (net.blip.visual_encoder.cls_token, net.blip.visual_encoder.pos_embed):
            p.normal_(0.0, 0.02)
    sd = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    # the published file also carries BLIP's position_ids buffer; the loader ignores it
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(text["max_position_embeddings"])[None]
    torch.save(sd, d / "ImageReward.pt")


TINY_HPSV3_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, max_position_embeddings=8192,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
TINY_HPSV3_VISION = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2)
TINY_HPSV3_HEAD = (64, 16, 2)


def tiny_qwen2vl_processor():
    """(processor, special ids): a byte-level Qwen2 tokenizer + Qwen2-VL image processor (patch 14, merge 2)."""
    from transformers import Qwen2Tokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS)})
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN_SPECIALS}
    ip = Qwen2VLImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}, patch_size=14,
                               temporal_patch_size=2, merge_size=2)
    video = None
    try:
        from transformers import Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor()
    except Exception:  # pragma: no cover - video processing is not used
        pass
    return Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=video,
                            chat_template=QWEN_CHAT_TEMPLATE), ids


def tiny_hpsv3(seed: int):
    """(net, processor, reward_token_id): a tiny HPSv3 on Qwen2-VL with the real patch 14 / merge 2 geometry.

    The saved tokenizer lacks ``<|Reward|>`` (like the real Qwen2-VL-7B-Instruct files); the loader adds it
    as id ``len(tokenizer)``, so the embedding has one more row than the saved tokenizer.
    """
    from transformers import Qwen2VLConfig

    from ._hpsv3_native import HPSv3RewardNet

    proc, ids = tiny_qwen2vl_processor()
    tok = proc.tokenizer
    reward_id = len(tok)
    cfg = Qwen2VLConfig(text_config=dict(TINY_HPSV3_TEXT, vocab_size=len(tok) + 1, pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id, bos_token_id=None),
                        vision_config=dict(TINY_HPSV3_VISION), image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    net = HPSv3RewardNet(cfg, reward_id, TINY_HPSV3_HEAD).eval()
    return net, proc, reward_id


def save_hpsv3_checkpoint(net, path: Path, seed: int) -> None:
    """``HPSv3.safetensors`` in the published key layout (+ a random ``lm_head.weight``, unused)."""
    from safetensors.torch import save_file

    from ._hpsv3_native import old_layout_key

    sd = {old_layout_key(k): v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    emb = sd["model.embed_tokens.weight"]
    sd["lm_head.weight"] = torch.randn(emb.shape, generator=g) * 0.02  # the base VLM's LM head (unused)
    save_file(sd, str(path))


def _build_hpsv3(out: Path, seed: int) -> None:
    """``hpsv3/{config.json, processor files, HPSv3.safetensors}`` (published key layout)."""
    from .hpsv3 import CHECKPOINT_NAMES

    d = out / "hpsv3"
    net, proc, _ = tiny_hpsv3(seed + 8)
    net.config.save_pretrained(d)
    proc.save_pretrained(d)
    save_hpsv3_checkpoint(net, d / CHECKPOINT_NAMES[0], seed + 9)


_BUILDERS = {
    "pickscore": _build_pickscore,
    "clipscore": _build_clip_l14,
    "aesthetic": _build_aesthetic,
    "hpsv2": _build_hpsv2,
    "geneval": _build_geneval,
    "geneval2": _build_geneval2,
    "imagereward": _build_imagereward,
    "hpsv3": _build_hpsv3,
}


def build_tiny_reward_checkpoints(out_dir, names: Iterable[str] | None = None, seed: int = 0) -> Path:
    """Write tiny random-weight checkpoints for ``names`` (default :data:`TINY_NAMES`) under ``out_dir``."""
    from .errors import UnknownRewardError

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(TINY_NAMES if names is None else names)
    bad = [n for n in names if n not in _BUILDERS]
    if bad:
        raise UnknownRewardError(f"no tiny checkpoint for {bad}; available: {', '.join(TINY_NAMES)}")
    for n in names:
        _BUILDERS[n](out, seed)
    (out / "TINY_REWARD_CHECKPOINTS.json").write_text(json.dumps({"seed": seed, "names": names}, indent=2))
    return out


__all__ = ["build_tiny_reward_checkpoints", "TINY_NAMES", "tiny_clip_tokenizer", "tiny_clip", "tiny_mask2former",
           "tiny_qwen3_vl", "tiny_bert_tokenizer", "tiny_hpsv3"]


def main(argv=None) -> int:
    """``python -m rtdmd.rewards.tiny --out DIR [--names a,b] [--seed N]`` (a DVC stage)."""
    import argparse
    import shutil
    import tempfile

    ap = argparse.ArgumentParser(description="write tiny random-weight reward checkpoints (real layouts)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--names", default="", help="comma-separated scorer names (default: all neural ones)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    names = [n for n in args.names.split(",") if n] or None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build_tiny_reward_checkpoints(tmp, names, seed=args.seed)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"tiny reward checkpoints written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
