"""HPSv3 native backend: tiny Qwen2-VL checkpoint through the real loader, μ at the reward token, errors."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil

import pytest
import torch
from PIL import Image

from rtdmd.rewards import CorruptCheckpointError, MissingBackendError, MissingCheckpointError, get_scorer
from rtdmd.rewards import _hpsv3_native as N

PROMPTS = ["a red cat on a sofa", "two dogs", 'a sign that says "hello"']


@pytest.fixture(scope="module")
def scorer(tiny_ckpt):
    return get_scorer("hpsv3", ckpt_dir=tiny_ckpt)


def _copy(tiny_ckpt, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(tiny_ckpt / "hpsv3", d / "hpsv3")
    return d


def test_default_backend_is_native(scorer):
    from rtdmd.rewards import list_scorers

    info = list_scorers()["hpsv3"]
    assert info.default_backend == "native" and info.backends == ("native", "hpsv3") and not info.differentiable
    net = scorer.inferencer.model
    assert scorer.backend == "native" and type(net.model).__name__ == "Qwen2VLModel"
    assert net.rm_head[0].weight.dtype == torch.float32 and not net.training
    assert [type(m).__name__ for m in net.rm_head] == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]


def test_one_finite_score_per_image(scorer):
    x = torch.rand(3, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    out = scorer(x, PROMPTS)
    assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    pil = [Image.new("RGB", (50, 70), (200, 10, 10)), Image.new("RGB", (90, 40), (0, 0, 255)),
           Image.new("RGB", (64, 64), (0, 255, 0))]
    out2 = scorer(pil, PROMPTS)
    assert out2.shape == (3,) and torch.isfinite(out2).all()
    torch.testing.assert_close(scorer(x, PROMPTS), out)


def test_mu_is_column_0_read_at_the_reward_token(scorer):
    ims = [Image.new("RGB", (80, 64), (200, 10, 10)), Image.new("RGB", (512, 512), (0, 0, 255))]
    inf = scorer.inferencer
    enc = inf.inputs(ims, PROMPTS[:2])
    net = inf.model
    with torch.no_grad():
        both = inf.reward(ims, PROMPTS[:2])
        n = enc["input_ids"].shape[1]
        pos = torch.arange(n).view(1, 1, n).expand(3, 2, n)  # QUIRK: plain 1-D positions on every M-RoPE axis
        hid = net.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], position_ids=pos,
                        pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]).last_hidden_state
    rid = net.reward_token_id
    assert rid == len(inf.processor.tokenizer) - 1  # <|Reward|> added by the loader, last id
    at = [(row == rid).nonzero().item() for row in enc["input_ids"]]
    want = net.rm_head(torch.stack([hid[i, j] for i, j in enumerate(at)]))
    assert both.shape == (2, 2)
    torch.testing.assert_close(both, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scorer(ims, PROMPTS[:2]), both[:, 0], atol=1e-5, rtol=1e-5)
    # right padding: the shorter sequence is padded after its reward token
    mask = enc["attention_mask"]
    assert mask[:, 0].all() and all(mask[i, : at[i] + 1].all() for i in range(2))


def test_prompt_and_preprocessing_constants(scorer):
    assert N.PIXEL_BUDGET == 256 * 28 * 28 == 200704 and N.REWARD_TOKEN == "<|Reward|>"
    t = N.PROMPT_TEMPLATE
    assert hashlib.sha256(t.encode()).hexdigest() == \
        "f6ee57479d4e9eee76b49c00dc962e1e696a5a2b3cc32cebd9b1fa76fe27502c"
    assert t.count("{text_prompt}") == 1 and t.count(N.REWARD_TOKEN) == 1
    assert t.endswith("Textual prompt - {text_prompt}\n\n\n\nPlease provide the overall ratings of this image: "
                      "<|Reward|>\n\nEND\n")
    assert N.format_prompt("a {b} cat").count("a {b} cat") == 1
    # smart resize to the fixed budget (sides multiples of 28)
    assert N.smart_resize(64, 80) == (420, 504)
    assert N.smart_resize(512, 512) == (448, 448)
    assert N.smart_resize(1024, 768) == (504, 364)
    with pytest.raises(ValueError, match="aspect ratio"):
        N.smart_resize(10, 2100)
    # the processor keeps that size: grid = (1, h/14, w/14); OpenAI CLIP normalisation of a constant image
    enc = scorer.inferencer.inputs([Image.new("RGB", (80, 64), (200, 10, 10))], ["a"])
    assert enc["image_grid_thw"].tolist() == [[1, 30, 36]]
    assert enc["pixel_values"].shape == (30 * 36, 3 * 2 * 14 * 14)
    px = enc["pixel_values"].view(-1, 3, 2 * 14 * 14)[:, :, 0]
    want = torch.tensor([(200 / 255 - 0.48145466) / 0.26862954, (10 / 255 - 0.4578275) / 0.26130258,
                         (10 / 255 - 0.40821073) / 0.27577711])
    torch.testing.assert_close(px, want.expand_as(px), atol=1e-4, rtol=0)
    text = scorer.inferencer.processor.tokenizer.decode(enc["input_ids"][0])
    assert "Textual prompt - a\n" in text and text.count(N.REWARD_TOKEN) == 1


def test_key_renaming_round_trip():
    for k in ["visual.blocks.0.attn.qkv.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight",
              "lm_head.weight", "rm_head.5.weight"]:
        assert N.old_layout_key(N.rename_key(k)) == k
    assert N.rename_key("visual.merger.mlp.0.weight") == "model.visual.merger.mlp.0.weight"
    assert N.rename_key("model.embed_tokens.weight") == "model.language_model.embed_tokens.weight"
    assert N.rename_key("model.language_model.norm.weight") == "model.language_model.norm.weight"


def test_published_key_layout_and_strict_check(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    f0 = tiny_ckpt / "hpsv3" / "HPSv3.safetensors"
    sd = load_file(str(f0))
    assert {k.split(".")[0] for k in sd} == {"visual", "model", "lm_head", "rm_head"}
    assert not any(k.startswith(("model.visual.", "model.language_model.")) for k in sd)
    d = _copy(tiny_ckpt, tmp_path)
    f = d / "hpsv3" / "HPSv3.safetensors"
    bad = dict(sd)
    bad["rm_head.9.weight"] = torch.zeros(2, 2)
    del bad["visual.merger.ln_q.weight"]
    save_file(bad, str(f))
    with pytest.raises(CorruptCheckpointError) as ei:
        get_scorer("hpsv3", ckpt_dir=d)
    msg = str(ei.value)
    assert "missing keys ['model.visual.merger.ln_q.weight']" in msg and "unexpected keys ['rm_head.9.weight']" in msg
    assert str(f) in msg
    # already-renamed (transformers-5 layout) keys load too
    save_file({N.rename_key(k): v for k, v in sd.items()}, str(f))
    assert get_scorer("hpsv3", ckpt_dir=d).inferencer.model.reward_token_id > 0


def test_corrupt_and_missing_files(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    f = d / "hpsv3" / "HPSv3.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 3])
    with pytest.raises(CorruptCheckpointError, match="truncated") as ei:
        get_scorer("hpsv3", ckpt_dir=d)
    assert str(f) in str(ei.value)
    f.write_bytes(data)
    (d / "hpsv3" / "config.json").unlink()
    with pytest.raises(MissingCheckpointError, match="config.json") as ei:
        get_scorer("hpsv3", ckpt_dir=d)
    assert "Qwen2-VL-7B-Instruct" in str(ei.value)


def test_missing_tokenizer_is_rejected(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path)
    (d / "hpsv3" / "tokenizer.json").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"tokenizer .* has \d+ tokens .* embeds 264"):
        get_scorer("hpsv3", ckpt_dir=d)


def test_package_backend_still_selectable(tiny_ckpt):
    if importlib.util.find_spec("hpsv3") is not None:
        pytest.skip("hpsv3 installed")
    with pytest.raises(MissingBackendError, match="pip install hpsv3"):
        get_scorer("hpsv3", ckpt_dir=tiny_ckpt, backend="hpsv3")
