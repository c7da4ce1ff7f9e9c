"""Preprocessing constants on a fixed image (rewards.md §0, §1.1–1.6, §3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rtdmd.rewards.base import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, center_crop, clip_tensor_transform, normalize,
                                pil_clip_transform, resize_max_and_pad, resize_shortest_edge)


def fixed_image(h=300, w=400) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 7) % 256], -1).astype(np.uint8)
    return img


def manual_pil_clip(img: np.ndarray, resample=Image.BICUBIC) -> torch.Tensor:
    """Reference recipe: shortest edge 224 (PIL), centre crop 224, /255, OpenAI normalisation."""
    im = Image.fromarray(img)
    w, h = im.size
    s = 224 / min(w, h)
    im = im.resize((int(w * s) if w > h else 224, int(h * s) if h > w else 224), resample)
    left, top = round((im.width - 224) / 2), round((im.height - 224) / 2)
    im = im.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)
    m, sd = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    return ((x - m) / sd)[None]


def test_openai_constants():
    assert OPENAI_CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert OPENAI_CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


def test_clip_processors_match_reference_recipe(tiny_ckpt):
    """pickscore/aesthetic eval path: the PIL processor = shortest-edge 224 bicubic + crop + OpenAI norm."""
    from rtdmd.rewards import _hfclip as H

    img = fixed_image()
    for sub in ("CLIP-ViT-H-14-laion2B-s32B-b79K", "clip-vit-large-patch14"):
        proc = H.load_image_processor(str(tiny_ckpt / sub), "t")
        assert tuple(proc.image_mean) == pytest.approx(OPENAI_CLIP_MEAN)
        assert tuple(proc.image_std) == pytest.approx(OPENAI_CLIP_STD)
        assert H.processor_geometry(proc)[:2] == (224, 224)
        assert int(proc.resample) == 3  # bicubic
        got = proc(images=[Image.fromarray(img)], return_tensors="pt")["pixel_values"]
        assert got.shape == (1, 3, 224, 224)
        torch.testing.assert_close(got, manual_pil_clip(img), atol=2e-5, rtol=0)
        # uint8 NCHW tensor input (the aesthetic path) gives the same pixels
        t = torch.from_numpy(img).permute(2, 0, 1)[None]
        torch.testing.assert_close(proc(images=t, return_tensors="pt")["pixel_values"], got, atol=2e-5, rtol=0)


def test_clipscore_tensor_transform_is_torchvision_bilinear_antialias():
    import torchvision.transforms as T

    x = torch.from_numpy(fixed_image()).permute(2, 0, 1)[None].float() / 255
    ref = T.Compose([T.Resize(224), T.CenterCrop(224), T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])(x)
    got = clip_tensor_transform(x)
    assert got.shape == (1, 3, 224, 224)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # the size rule: shortest edge -> 224, the long side truncated (400*224/300 = 298.67 -> 298)
    assert resize_shortest_edge(x).shape[-2:] == (224, 298)
    # bilinear (clipscore, BP pickscore) differs from bicubic (eval pickscore)
    bic = manual_pil_clip(fixed_image())
    assert (got - bic).abs().max() > 1e-3


def test_hpsv2_resize_max_and_symmetric_pad():
    x = torch.ones(1, 3, 100, 400)  # wide: scale 224/400 -> 56×224, pad 168 rows
    y = resize_max_and_pad(x)
    assert y.shape == (1, 3, 224, 224)
    col = y[0, 0, :, 112]
    assert (col[:84] == 0).all() and (col[84 + 56:] == 0).all()  # top pad = 168//2 = 84
    torch.testing.assert_close(col[84:140], torch.ones(56), atol=1e-5, rtol=0)
    x = torch.ones(1, 3, 225, 100)  # odd padding: left pad//2, right the rest
    y = resize_max_and_pad(x)
    nw = round(100 * 224 / 225)
    pad = 224 - nw
    row = y[0, 0, 112]
    assert (row[: pad // 2] == 0).all() and (row[pad // 2 + nw:] == 0).all() and row[pad // 2] > 0.5
    # a square image is resized without padding; scale exactly 1 is the identity
    sq = torch.rand(1, 3, 1024, 1024)
    assert resize_max_and_pad(sq).shape == (1, 3, 224, 224)
    small = torch.rand(1, 3, 224, 100)
    assert resize_max_and_pad(small) is small
    # bicubic resize
    z = torch.rand(1, 3, 448, 448)
    torch.testing.assert_close(resize_max_and_pad(z),
                               torch.nn.functional.interpolate(z, size=(224, 224), mode="bicubic"))


def test_hpsv2_scorer_uses_openai_norm_and_padding(tiny_scorers):
    s = tiny_scorers("hpsv2")
    assert s.mean == pytest.approx(OPENAI_CLIP_MEAN) and s.std == pytest.approx(OPENAI_CLIP_STD)
    x = torch.zeros(1, 3, 112, 224)
    y = s.transform(x)
    expected_pad = normalize(torch.zeros(1, 3, 1, 1))
    torch.testing.assert_close(y[:, :, 0:1, 0:1], expected_pad)


def test_imagereward_pipelines():
    img = Image.fromarray(fixed_image())
    torch.testing.assert_close(pil_clip_transform(img), manual_pil_clip(fixed_image()), atol=1e-6, rtol=0)
    sq = pil_clip_transform(img, crop=False)
    assert sq.shape == (1, 3, 224, 224)


def test_center_crop_matches_torchvision():
    import torchvision.transforms.functional as TF

    x = torch.rand(1, 3, 231, 300)
    torch.testing.assert_close(center_crop(x, 224), TF.center_crop(x, [224, 224]))
