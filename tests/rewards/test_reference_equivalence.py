"""Our reward backends against the reference packages on the SAME random-weight checkpoint.

The checkpoints (:mod:`rtdmd.rewards.realwidth`) keep every published width, head count, activation
and eps and shrink only the layer counts. The reference half runs ``image-reward==1.5``,
``hpsv2x==1.2.0`` and ``hpsv3==1.0.0`` in the isolated env of ``tests/rewards/refenv`` (built on first
use, cached under ``~/.cache/rtdmd``; a failed build fails these tests). Both halves run in fp32 on
the CPU. Each comparison is also shown to fail for a planted one-line difference in our backend
(a LayerNorm/RMSNorm eps, a resize filter), so the tolerance is tight enough to catch them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from refenv import run_reference
from rtdmd.rewards.base import normalize

pytestmark = pytest.mark.slow

PROMPTS = ["a red cat on a sofa", "two dogs", 'a sign that says "hello"']
#: Bounds on |ours - reference| in fp32: absolute on the score, relative to max|grad| on the gradient.
#: Measured agreement is ~1e-7 (README reward table); the planted differences move the score by >2e-5.
SCORE_TOL = 1e-5
GRAD_TOL = 1e-4


def _images(seed: int = 0) -> list[torch.Tensor]:
    """Three smooth uint8 ``[H,W,3]`` images of different sizes/aspects (a downscale, a crop, no resize)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in ((256, 320), (300, 200), (224, 224)):
        x = torch.rand(1, 3, h // 8, w // 8, generator=g)
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False) * 0.8 \
            + 0.2 * torch.rand(1, 3, h, w, generator=g)
        out.append((x[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8))
    return out


def _image_tensors(imgs) -> dict[str, torch.Tensor]:
    return {f"image{i}": im for i, im in enumerate(imgs)}


def _pil(imgs) -> list[Image.Image]:
    return [Image.fromarray(im.numpy()) for im in imgs]


def _bp_pixels(imgs, size: int = 224) -> torch.Tensor:
    """Model-ready pixels: bicubic to size×size, OpenAI normalisation (the BP path's input)."""
    x = [F.interpolate(im.permute(2, 0, 1)[None].float() / 255, size=(size, size), mode="bicubic",
                       align_corners=False) for im in imgs]
    return normalize(torch.cat(x))


def _report(scorer: str, **diffs: float) -> None:
    """The agreement reached (shown with ``pytest -s``; the README table quotes it)."""
    print(f"\n{scorer} vs reference: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


def _maxdiff(a, b) -> float:
    return float((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max())


@pytest.fixture(scope="module")
def real_width(tmp_path_factory):
    from rtdmd.rewards.realwidth import build_real_width_checkpoints

    root = tmp_path_factory.mktemp("realwidth")

    def get(name: str) -> Path:
        d = root / name
        if not d.is_dir():
            build_real_width_checkpoints(d, [name])
        return d

    return get


# --------------------------------------------------------------------------- ImageReward


def test_imagereward_matches_image_reward_package(real_width, tmp_path, monkeypatch):
    from rtdmd.rewards import imagereward as IR

    ckpt = real_width("imagereward")
    imgs = _images()
    px = _bp_pixels(imgs)
    ref, info = run_reference("imagereward", ckpt, tmp_path / "ref", PROMPTS, dict(_image_tensors(imgs), pixels=px))
    assert info["keys"] == {"missing": [], "unexpected": []}  # same file, every tensor used by both

    scorer = IR.build(ckpt)
    ids, mask = scorer._tokens(PROMPTS, IR.TEXT_MAX_LENGTH)
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])

    # eval path: PIL preprocessing (shortest edge 224 bicubic, centre crop) + network + standardisation
    ours = scorer(_pil(imgs), PROMPTS)
    assert _maxdiff(ours, ref["score"]) < SCORE_TOL, (ours, ref["score"])

    # score_gard and its gradient w.r.t. the pixels
    x = px.clone().requires_grad_(True)
    r = scorer.model.score_gard(ids, mask, x).reshape(-1)
    r.sum().backward()
    assert _maxdiff(r.detach(), ref["score_gard"]) < SCORE_TOL
    assert _maxdiff(x.grad, ref["grad"]) < GRAD_TOL * float(ref["grad"].abs().max())
    _report("imagereward", score=_maxdiff(ours, ref["score"]), score_gard=_maxdiff(r.detach(), ref["score_gard"]),
            grad_rel=_maxdiff(x.grad, ref["grad"]) / float(ref["grad"].abs().max()))

    # planted differences are caught: one BERT LayerNorm eps (med_config's 1e-12 -> torch's default 1e-5),
    # the PIL resize filter (bicubic -> bilinear)
    ln = scorer.model.blip.text_encoder.encoder.layer[0].attention.output.LayerNorm
    monkeypatch.setattr(ln, "eps", 1e-5)
    assert _maxdiff(scorer(_pil(imgs), PROMPTS), ref["score"]) > SCORE_TOL
    monkeypatch.setattr(ln, "eps", 1e-12)
    orig = IR.pil_clip_transform
    monkeypatch.setattr(IR, "pil_clip_transform", lambda im, size: orig(im, size, resample=Image.BILINEAR))
    assert _maxdiff(scorer(_pil(imgs), PROMPTS), ref["score"]) > SCORE_TOL


# --------------------------------------------------------------------------- HPSv2


def test_hpsv2_matches_hpsv2x_package(real_width, tmp_path, monkeypatch):
    from rtdmd.rewards import hpsv2 as H

    ckpt = real_width("hpsv2")
    imgs = _images(1)
    scorer = H.build(ckpt)
    # our preprocessing (longer side 224 bicubic, zero pad, normalise) gives the pixels both networks see
    px = torch.cat([scorer.transform(im.permute(2, 0, 1)[None].float() / 255) for im in imgs])
    ref, info = run_reference("hpsv2", ckpt, tmp_path / "ref", PROMPTS, {"pixels": px})
    assert info["keys"] == {"missing": [], "unexpected": []}
    assert torch.equal(scorer.tokenizer(PROMPTS), ref["tokens"])

    xg = px.clone().requires_grad_(True)
    s = scorer._forward(xg, PROMPTS)
    s.sum().backward()
    assert _maxdiff(s.detach(), ref["score"]) < SCORE_TOL, (s, ref["score"])
    assert _maxdiff(xg.grad, ref["grad"]) < GRAD_TOL * float(ref["grad"].abs().max())
    _report("hpsv2", score=_maxdiff(s.detach(), ref["score"]),
            grad_rel=_maxdiff(xg.grad, ref["grad"]) / float(ref["grad"].abs().max()))

    # planted: one LayerNorm eps of the text tower (open_clip's 1e-5 -> 1e-6)
    ln = scorer.model.transformer.resblocks[0].ln_1
    monkeypatch.setattr(ln, "eps", 1e-6)
    with torch.no_grad():
        assert _maxdiff(scorer._forward(px, PROMPTS), ref["score"]) > SCORE_TOL


# --------------------------------------------------------------------------- HPSv3


def test_hpsv3_matches_hpsv3_package(real_width, tmp_path, monkeypatch):
    from rtdmd.rewards import _hpsv3_native as N
    from rtdmd.rewards import hpsv3 as H3

    ckpt = real_width("hpsv3")
    imgs = _images(2)[:2]
    prompts = PROMPTS[:2]
    ref, info = run_reference("hpsv3", ckpt, tmp_path / "ref", prompts, _image_tensors(imgs))
    inf = H3.build_native(ckpt)
    enc = inf.inputs(_pil(imgs), prompts)
    assert torch.equal(enc["input_ids"], ref["input_ids"])
    assert torch.equal(enc["image_grid_thw"], ref["image_grid_thw"])
    assert _maxdiff(enc["pixel_values"], ref["pixel_values"]) < 1e-5
    with torch.no_grad():
        ours = inf.model(**enc)
    assert _maxdiff(ours, ref["reward"]) < SCORE_TOL, (ours, ref["reward"])
    _report("hpsv3", pixels=_maxdiff(enc["pixel_values"], ref["pixel_values"]), mu_sigma=_maxdiff(ours, ref["reward"]))

    # planted: the first RMSNorm eps (1e-6 -> 1e-5) and the pre-resize filter (bicubic -> bilinear)
    norm = inf.model.model.language_model.layers[0].input_layernorm
    attr = "variance_epsilon" if hasattr(norm, "variance_epsilon") else "eps"
    monkeypatch.setattr(norm, attr, 1e-5)
    with torch.no_grad():
        assert _maxdiff(inf.model(**enc), ref["reward"]) > SCORE_TOL
    monkeypatch.setattr(norm, attr, 1e-6)
    def bilinear(img, factor=28, budget=N.PIXEL_BUDGET):
        h, w = N.smart_resize(img.height, img.width, factor, budget, budget)
        return img.convert("RGB").resize((w, h), Image.BILINEAR)

    monkeypatch.setattr(N, "resize_for_budget", bilinear)
    assert _maxdiff(inf.inputs(_pil(imgs), prompts)["pixel_values"], ref["pixel_values"]) > 1e-2
