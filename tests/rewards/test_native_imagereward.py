"""ImageReward native backend: tiny checkpoint through the real loader, formula, preprocessing, gradients, errors."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_gradients import _fd_check

from rtdmd.rewards import CorruptCheckpointError, MissingBackendError, MissingCheckpointError, get_scorer
from rtdmd.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, pil_clip_transform
from rtdmd.rewards.imagereward import REWARD_MEAN, REWARD_STD

PROMPTS = ["a red cat on a sofa", "two dogs", 'a sign that says "hello"']


@pytest.fixture(scope="module")
def scorer(tiny_ckpt):
    return get_scorer("imagereward", ckpt_dir=tiny_ckpt)


def _copy(tiny_ckpt, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(tiny_ckpt / "ImageReward", d / "ImageReward")
    return d


def _capture_pixels(s):
    seen = []
    h = s.model.blip.visual_encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    return seen, h


def test_default_backend_is_native(scorer):
    from rtdmd.rewards import list_scorers
    from rtdmd.rewards._blip import ImageRewardNet

    info = list_scorers()["imagereward"]
    assert info.default_backend == "native" and info.backends == ("native", "image-reward") and info.differentiable
    assert scorer.backend == "native" and isinstance(scorer.model, ImageRewardNet)
    assert not any(p.requires_grad for p in scorer.model.parameters()) and not scorer.model.training


def test_one_finite_score_per_image(scorer):
    x = torch.rand(3, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    out = scorer(x, PROMPTS)
    assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    pil = [Image.new("RGB", (50, 70), (200, 10, 10)), Image.new("RGB", (90, 40), (0, 0, 255)),
           Image.new("RGB", (300, 224), (0, 255, 0))]
    out2 = scorer(pil, PROMPTS)
    assert out2.shape == (3,) and torch.isfinite(out2).all()
    torch.testing.assert_close(scorer(x, PROMPTS), out)  # deterministic (eval mode)
    # pairs are scored directly: a single pair gives the same number as inside a batch
    torch.testing.assert_close(scorer(x[1:2], PROMPTS[1:2]), out[1:2], atol=1e-5, rtol=1e-5)


def test_tokenizer_blip_tokens_and_no_enc_swap(scorer, tiny_ckpt):
    tok = scorer.model.blip.tokenizer
    med = json.loads((tiny_ckpt / "ImageReward" / "med_config.json").read_text())
    assert len(tok) == med["vocab_size"] == 143
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [141, 142]
    ids, mask = scorer._tokens(["A red cat"], 35)
    assert ids.shape == mask.shape == (1, 35)
    assert ids[0, 0].item() == tok.cls_token_id  # [CLS] is kept; ImageReward does not swap in [ENC]
    assert mask[0].tolist() == [1] * 9 + [0] * 26  # [CLS] a r ##e ##d c ##a ##t [SEP], then padding
    long_ids, _ = scorer._tokens([" ".join(["x"] * 100)], 35)
    assert long_ids.shape == (1, 35) and long_ids[0, -1].item() == tok.sep_token_id  # truncated


def test_formula_matches_manual_forward(scorer):
    x = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    got = scorer(x, PROMPTS[:2])
    m = scorer.model
    enc = m.blip.tokenizer(PROMPTS[:2], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    px = torch.cat([pil_clip_transform(Image.fromarray(a), 224) for a in
                    (torch.round(x * 255).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())])
    img = m.blip.visual_encoder(px)
    assert img.shape == (2, 1 + (224 // 16) ** 2, 32)
    hid = m.blip.text_encoder(enc.input_ids, enc.attention_mask, img)
    raw = m.mlp(hid[:, 0, :]).squeeze(1)
    torch.testing.assert_close(got, (raw - REWARD_MEAN) / REWARD_STD, atol=1e-5, rtol=1e-5)
    assert (m.mean, m.std) == (0.16717362830052426, 1.0333394966054072)
    # padding tokens do not change the [CLS] output (masked self-attention)
    hid36 = m.blip.text_encoder(torch.cat([enc.input_ids, torch.zeros(2, 1, dtype=torch.long)], 1),
                                torch.cat([enc.attention_mask, torch.zeros(2, 1, dtype=torch.long)], 1), img)
    torch.testing.assert_close(hid36[:, 0], hid[:, 0], atol=1e-5, rtol=1e-5)


def test_preprocessing_constants(scorer):
    # eval: shortest edge 224 (PIL bicubic), centre crop, /255, OpenAI mean/std; constant colour stays constant
    seen, h = _capture_pixels(scorer)
    try:
        scorer([Image.new("RGB", (300, 150), (200, 10, 10))], ["a"])
        want = torch.tensor([(200 / 255 - OPENAI_CLIP_MEAN[0]) / OPENAI_CLIP_STD[0],
                             (10 / 255 - OPENAI_CLIP_MEAN[1]) / OPENAI_CLIP_STD[1],
                             (10 / 255 - OPENAI_CLIP_MEAN[2]) / OPENAI_CLIP_STD[2]])
        assert seen[-1].shape == (1, 3, 224, 224)
        torch.testing.assert_close(seen[-1][0, :, 100, 100], want, atol=1e-5, rtol=0)
        # centre crop of the shortest-edge resize: a left/right split image keeps its split at the centre
        im = Image.new("RGB", (448, 224), (0, 0, 0))
        im.paste((255, 255, 255), (224, 0, 448, 224))
        scorer([im], ["a"])
        row = seen[-1][0, 0, 112]
        assert row[:110].max() < 0 and row[114:].min() > 0  # the split stays at column 112
        # BP: bicubic resize to exactly 224x224 (no crop) of the float tensor, then normalisation
        x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(1))
        scorer.score_differentiable(x, ["a"])
        ref = normalize(F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False))
        torch.testing.assert_close(seen[-1], ref)
    finally:
        h.remove()


def test_bp_equals_eval_on_224_uint8_images(scorer):
    x = torch.randint(0, 256, (2, 3, 224, 224), generator=torch.Generator().manual_seed(2)).float() / 255
    a = scorer.score_differentiable(x, PROMPTS[:2]).detach()
    torch.testing.assert_close(a, scorer(x, PROMPTS[:2]), atol=1e-5, rtol=1e-5)


def test_gradcheck_float64(tiny_ckpt):
    s = get_scorer("imagereward", ckpt_dir=tiny_ckpt)
    s.to(dtype=torch.float64)
    x = 0.2 + 0.6 * torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _fd_check(lambda t: s.score_differentiable(t, ["a red cat", "a dog"]), x)


def test_missing_files_are_named(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    shutil.rmtree(d / "ImageReward" / "bert-base-uncased")
    with pytest.raises(MissingCheckpointError, match="bert-base-uncased"):
        get_scorer("imagereward", ckpt_dir=d)
    (d / "ImageReward" / "med_config.json").unlink()
    with pytest.raises(MissingCheckpointError, match="med_config.json") as ei:
        get_scorer("imagereward", ckpt_dir=d)
    assert str(d) in str(ei.value)


def test_corrupt_weights_and_config(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    f = d / "ImageReward" / "ImageReward.pt"
    good = f.read_bytes()
    f.write_bytes(good[: len(good) // 3])
    with pytest.raises(CorruptCheckpointError, match="weights_only") as ei:
        get_scorer("imagereward", ckpt_dir=d)
    assert str(f) in str(ei.value)
    f.write_bytes(good)
    med = d / "ImageReward" / "med_config.json"
    cfg = json.loads(med.read_text())
    med.write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    with pytest.raises(CorruptCheckpointError, match="hidden_size"):
        get_scorer("imagereward", ckpt_dir=d)
    med.write_text(json.dumps(dict(cfg, num_hidden_layers=3)))  # config does not fit the weights
    with pytest.raises(CorruptCheckpointError, match=r"missing keys \['blip.text_encoder.encoder.layer.2"):
        get_scorer("imagereward", ckpt_dir=d)


def test_strict_key_check(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    f = d / "ImageReward" / "ImageReward.pt"
    sd = torch.load(f, weights_only=True)
    sd["blip.itm_head.weight"] = torch.zeros(2, 32)
    del sd["mlp.layers.7.bias"]
    torch.save(sd, f)
    with pytest.raises(CorruptCheckpointError) as ei:
        get_scorer("imagereward", ckpt_dir=d)
    msg = str(ei.value)
    assert "missing keys ['mlp.layers.7.bias']" in msg and "unexpected keys ['blip.itm_head.weight']" in msg
    assert str(f) in msg


def test_garbage_tokenizer_is_rejected(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    tok = d / "ImageReward" / "bert-base-uncased"
    for p in tok.iterdir():
        p.unlink()
    (tok / "tokenizer_config.json").write_text("{}")  # what an incomplete download leaves
    with pytest.raises(CorruptCheckpointError, match="tokens"):
        get_scorer("imagereward", ckpt_dir=d)


def test_package_backend_still_selectable(tiny_ckpt):
    if importlib.util.find_spec("ImageReward") is not None:
        pytest.skip("image-reward installed")
    with pytest.raises(MissingBackendError, match=r"rtdmd\[imagereward\]"):
        get_scorer("imagereward", ckpt_dir=tiny_ckpt, backend="image-reward")
