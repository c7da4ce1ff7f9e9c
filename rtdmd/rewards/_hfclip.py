"""Shared helpers for the HF-transformers CLIP scorers (pickscore, clipscore, aesthetic)."""

from __future__ import annotations

from typing import Any

import torch

from .ckpt import wrap_load_errors

TEXT_MAX_LENGTH = 77


def load_clip_model(src: str, scorer: str, device) -> torch.nn.Module:
    from transformers import CLIPModel

    model = wrap_load_errors(scorer, src, lambda: CLIPModel.from_pretrained(src, dtype=torch.float32))
    return model.eval().requires_grad_(False).to(device)


def load_image_processor(src: str, scorer: str):
    """The PIL-backend CLIP image processor: shortest edge 224 bicubic, crop 224, OpenAI mean/std.

    transformers 5 defaults ``CLIPImageProcessor`` to a torchvision backend; the
    PIL backend (``CLIPImageProcessorPil``) reproduces the transformers-4 slow
    processor the reference numbers were computed with.
    """
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return wrap_load_errors(scorer, src, lambda: cls.from_pretrained(src))


def load_tokenizer(src: str, scorer: str):
    from transformers import AutoTokenizer

    tok = wrap_load_errors(scorer, src, lambda: AutoTokenizer.from_pretrained(src))
    if len(tok) < 100:  # transformers 5 returns an empty tokenizer instead of raising (rewards.md §3a)
        from .errors import CorruptCheckpointError

        raise CorruptCheckpointError(f"{scorer}: tokenizer loaded from '{src}' has only {len(tok)} tokens "
                                     "(missing vocab.json/merges.txt/tokenizer.json?)")
    return tok


def tokenize(tokenizer, prompts: list[str], device) -> dict[str, torch.Tensor]:
    enc = tokenizer(prompts, padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH,
                    return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def _pooled(out: Any) -> torch.Tensor:
    # transformers 5: get_*_features return BaseModelOutputWithPooling; the projection is .pooler_output
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


def image_embeds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    return _pooled(model.get_image_features(pixel_values=pixel_values))


def text_embeds(model, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    return _pooled(model.get_text_features(**enc))


def processor_pixels(processor, images, device, dtype) -> torch.Tensor:
    px = processor(images=images, return_tensors="pt")["pixel_values"]
    return px.to(device=device, dtype=dtype)


def processor_geometry(processor) -> tuple[int, int, tuple, tuple]:
    """(resize shortest edge, crop size, mean, std) of a CLIP image processor (BP tensor transforms)."""
    crop = _field(processor.crop_size, "height")
    size = _field(processor.size, "shortest_edge")
    return int(size if size is not None else crop), int(crop), tuple(processor.image_mean), \
        tuple(processor.image_std)


def _field(d, key):
    """``d[key]`` for dicts and transformers-5 ``SizeDict`` objects; ``d`` itself for ints."""
    if d is None or isinstance(d, (int, float)):
        return d
    try:
        v = d[key]
    except (KeyError, TypeError):
        v = getattr(d, key, None)
    return v


def cast_like(x: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    p = next(model.parameters())
    return x.to(device=p.device, dtype=p.dtype)


__all__ = [n for n in dir() if not n.startswith("_") and n not in ("annotations", "Path", "Any", "torch")]
