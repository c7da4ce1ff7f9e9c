"""Every neural scorer built from tiny checkpoints through the real loaders; scaling formulas; ckpt errors."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from PIL import Image

from rtdmd.rewards import CorruptCheckpointError, MissingCheckpointError, get_scorer
from rtdmd.rewards.base import validate_images

NEURAL = ["pickscore", "clipscore", "aesthetic", "hpsv2", "geneval", "geneval2", "imagereward", "hpsv3"]
VQA = [{"vqa_list": [["Is there a cat?", "Yes"], ["How many dogs are there?", "two"]]}] * 3
META = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}]},
        {"tag": "counting", "include": [{"class": "dog", "count": 2}]},
        {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}]


@pytest.mark.parametrize("name", NEURAL)
def test_one_finite_score_per_image(tiny_scorers, images, prompts, name):
    s = tiny_scorers(name)
    md = META if name == "geneval" else VQA if name == "geneval2" else None
    out = s(images, prompts, md)
    assert out.dtype == torch.float32 and out.shape == (3,) and not out.requires_grad
    assert torch.isfinite(out).all()
    # a list of PIL images of different sizes works too
    pil = [Image.new("RGB", (50, 70), (200, 10, 10)), Image.new("RGB", (90, 40), (0, 0, 255)),
           Image.new("RGB", (64, 64), (0, 255, 0))]
    out2 = s(pil, prompts, md)
    assert out2.shape == (3,) and torch.isfinite(out2).all()
    # same image batch twice -> same scores (eval mode, no dropout)
    torch.testing.assert_close(s(images, prompts, md), out)


def test_geneval2_tiny_qwen3_vl_judge(tiny_scorers):
    import math

    s = tiny_scorers("geneval2")
    assert type(s.judge.model).__name__ == "Qwen3VLForConditionalGeneration"
    im = Image.new("RGB", (64, 48), (10, 200, 10))
    p = s.judge.next_token_probs(im, "Is there a cat? Answer in one word.")
    assert p.ndim == 1 and float(p.sum()) == pytest.approx(1.0, abs=1e-5)
    atoms = [s.atom_score(im, q, a) for q, a in VQA[0]["vqa_list"]]
    want = sum(float(p[s.judge.first_token_id(v)]) for v in ["Yes", "yes", " Yes", " yes"])
    assert atoms[0] == pytest.approx(want)
    got = s([im], ["a cat and two dogs"], VQA[:1])
    assert got.item() == pytest.approx(math.sqrt(atoms[0] * atoms[1]), rel=1e-5)


def _clip_forward_diag(model, proc_pixels, tok, prompts):
    enc = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=proc_pixels)
    return out.logits_per_image.diagonal()


def test_pickscore_formula(tiny_scorers, images, prompts):
    s = tiny_scorers("pickscore")
    px = s.image_processor(images=validate_images(images).pil(), return_tensors="pt")["pixel_values"]
    ref = _clip_forward_diag(s.model, px, s.tokenizer, prompts) / 26
    torch.testing.assert_close(s(images, prompts), ref, atol=1e-5, rtol=1e-5)
    assert float(s.model.logit_scale.exp()) == pytest.approx(100.0, rel=1e-4)  # as PickScore: 100·cos/26


def test_clipscore_formula(tiny_scorers, images, prompts):
    s = tiny_scorers("clipscore")
    q = torch.cat(validate_images(images).float_list())
    ref = _clip_forward_diag(s.model, s.transform(q), s.tokenizer, prompts) / 100
    torch.testing.assert_close(s(images, prompts), ref, atol=1e-5, rtol=1e-5)


def test_aesthetic_formula_and_prompt_ignored(tiny_scorers, images, prompts):
    s = tiny_scorers("aesthetic")
    px = s.image_processor(images=validate_images(images).pil(), return_tensors="pt")["pixel_values"]
    emb = s.clip.get_image_features(pixel_values=px).pooler_output
    ref = s.mlp(emb / emb.norm(dim=-1, keepdim=True)).squeeze(1)
    torch.testing.assert_close(s(images, prompts), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s(images, ["x", "y", "z"]), s(images, prompts))
    acts = [type(m).__name__ for m in s.mlp.layers]
    assert acts == ["Linear", "Dropout", "Linear", "Dropout", "Linear", "Dropout", "Linear", "Linear"]
    assert [m.p for m in s.mlp.layers if isinstance(m, torch.nn.Dropout)] == [0.2, 0.2, 0.1]


def test_hpsv2_formula(tiny_scorers, tiny_ckpt, images, prompts):
    s = tiny_scorers("hpsv2")
    q = torch.cat(validate_images(images).float_list())
    img = s.model.encode_image(s.transform(q))
    txt = s.model.encode_text(s.tokenizer(prompts))
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(s(images, prompts), (img @ txt.T).diagonal(), atol=1e-5, rtol=1e-5)
    # both checkpoint files were loaded: the HPS state_dict (second file) wins
    sd = torch.load(tiny_ckpt / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    k = "text_projection"
    torch.testing.assert_close(s.model.state_dict()[k], sd[k])


def test_builder_is_deterministic(tmp_path, tiny_ckpt):
    from rtdmd.rewards.tiny import build_tiny_reward_checkpoints

    out = build_tiny_reward_checkpoints(tmp_path / "again", names=["aesthetic", "hpsv2", "imagereward", "hpsv3"])
    for rel in ["sac+logos+ava1-l14-linearMSE.pth", "HPS_v2.1_compressed.pt",
                "clip-vit-large-patch14/model.safetensors", "ImageReward/ImageReward.pt", "hpsv3/HPSv3.safetensors"]:
        a = hashlib.sha256((out / rel).read_bytes()).hexdigest()
        b = hashlib.sha256((tiny_ckpt / rel).read_bytes()).hexdigest()
        assert a == b, rel


def test_env_var_resolved_at_construction(tiny_ckpt, monkeypatch, images, prompts):
    monkeypatch.setenv("RTDMD_REWARD_CKPT_PATH", str(tiny_ckpt))
    s = get_scorer("clipscore")  # no ckpt_dir: the env var, read now
    assert s(images, prompts).shape == (3,)


@pytest.mark.parametrize("name, rel", [
    ("aesthetic", "sac+logos+ava1-l14-linearMSE.pth"),
    ("hpsv2", "HPS_v2.1_compressed.pt"),
    ("hpsv2", "open_clip_pytorch_model.bin"),
    ("clipscore", "clip-vit-large-patch14/model.safetensors"),
    ("pickscore", "PickScore_v1/model.safetensors"),
])
def test_corrupt_checkpoint_names_the_file(tiny_ckpt, tmp_path, name, rel):
    d = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, d)
    f = d / rel
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 3])  # truncated download
    with pytest.raises(CorruptCheckpointError) as ei:
        get_scorer(name, ckpt_dir=d)
    assert str(f.parent if rel.endswith("safetensors") else f) in str(ei.value)


@pytest.mark.parametrize("name, missing", [
    ("aesthetic", "sac+logos+ava1-l14-linearMSE.pth"),
    ("hpsv2", "HPS_v2.1_compressed.pt"),
    ("pickscore", "PickScore_v1"),
    ("clipscore", "clip-vit-large-patch14"),
    ("geneval", "geneval/mask2former"),
    ("imagereward", "ImageReward/ImageReward.pt"),
    ("hpsv3", "HPSv3.safetensors"),
    ("geneval2", "Qwen3-VL-8B-Instruct"),
])
def test_missing_checkpoint_one_clear_error(tmp_path, name, missing):
    with pytest.raises(MissingCheckpointError) as ei:
        get_scorer(name, ckpt_dir=tmp_path)
    msg = str(ei.value)
    assert missing in msg and "RTDMD_REWARD_CKPT_PATH" in msg and str(tmp_path) in msg
    assert isinstance(ei.value, FileNotFoundError)


def test_no_ckpt_dir_and_no_hub(monkeypatch):
    with pytest.raises(MissingCheckpointError, match="RTDMD_REWARD_CKPT_PATH.*unset|unset"):
        get_scorer("clipscore")
    monkeypatch.setenv("RTDMD_REWARD_ALLOW_HUB", "1")  # HF_HUB_OFFLINE=1 still wins
    with pytest.raises(MissingCheckpointError, match="openai/clip-vit-large-patch14"):
        get_scorer("clipscore")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_aesthetic_refuses_pickled_code(tiny_ckpt, tmp_path):
    import pickle

    d = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, d)

    class Evil:
        def __reduce__(self):
            return (print, ("executed!",))

    with open(d / "sac+logos+ava1-l14-linearMSE.pth", "wb") as f:
        pickle.dump({"layers.0.weight": Evil()}, f)
    with pytest.raises(CorruptCheckpointError, match="weights_only"):
        get_scorer("aesthetic", ckpt_dir=d)
