"""HPSv3 / GenEval2 / ImageReward glue with stub models (the real models are optional extras or 7–8 B VLMs)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from rtdmd.rewards import MissingBackendError, MissingCheckpointError, RewardInputError, get_scorer
from rtdmd.rewards import geneval2 as G2
from rtdmd.rewards import hpsv3 as H3
from rtdmd.rewards.imagereward import REWARD_MEAN, REWARD_STD, diagonal_of_square


# ----------------------------------------------------------------------------- HPSv3

class StubInferencer:
    def __init__(self, accept_pil=True):
        self.accept_pil = accept_pil
        self.seen = []

    def reward(self, images, prompts):
        self.seen.append(type(images[0]).__name__)
        if not self.accept_pil and not isinstance(images[0], str):
            raise TypeError("paths only")
        n = len(images)
        return torch.stack([torch.arange(n, dtype=torch.float32) + 10.0, torch.full((n,), 0.5)], dim=1)


@pytest.mark.parametrize("accept_pil", [True, False])
def test_hpsv3_mu_column_and_temp_png_fallback(accept_pil):
    inf = StubInferencer(accept_pil)
    s = H3.HPSv3Scorer(inf)
    out = s(torch.rand(3, 3, 16, 16), ["a", "b", "c"])
    assert out.tolist() == [10.0, 11.0, 12.0]
    assert inf.seen[-1] == ("Image" if accept_pil else "str")
    assert H3.mu_column([[1.0, 2.0], [3.0, 4.0]]).tolist() == [1.0, 3.0]


def test_hpsv3_path_resolution(tmp_path, monkeypatch):
    (tmp_path / "HPSv3").mkdir()
    (tmp_path / "HPSv3" / "model.pt").write_bytes(b"x")
    (tmp_path / "HPSv3.pt").write_bytes(b"x")
    (tmp_path / "hpsv3.yaml").write_text("a: 1")
    cfg, ck = H3.resolve_paths(tmp_path)
    assert cfg == tmp_path / "hpsv3.yaml"
    assert ck == tmp_path / "HPSv3" / "model.pt"  # directories first (hpsv3, HPSv3, root), then names in order
    monkeypatch.setenv("RTDMD_HPSV3_CHECKPOINT_PATH", "/x/y.safetensors")
    assert H3.resolve_paths(tmp_path)[1].as_posix() == "/x/y.safetensors"


def test_hpsv3_key_renaming():
    assert H3._rename_key("visual.blocks.0.w") == "model.visual.blocks.0.w"
    assert H3._rename_key("model.layers.0.w") == "model.language_model.layers.0.w"
    assert H3._rename_key("model.visual.x") == "model.visual.x"
    assert H3._rename_key("model.language_model.x") == "model.language_model.x"
    assert H3._rename_key("rm_head.0.weight") == "rm_head.0.weight"


def test_hpsv3_missing_package_names_install(tmp_path):
    if importlib.util.find_spec("hpsv3") is not None:
        pytest.skip("hpsv3 installed")
    (tmp_path / "hpsv3").mkdir()
    (tmp_path / "hpsv3" / "HPSv3.safetensors").write_bytes(b"x")
    with pytest.raises(MissingBackendError, match="pip install hpsv3"):
        get_scorer("hpsv3", ckpt_dir=tmp_path, backend="hpsv3")


# ----------------------------------------------------------------------------- GenEval2

def test_answer_variants():
    assert G2.answer_variants("Is the cat red?", "Yes") == ["Yes", "yes", " Yes", " yes"]
    assert G2.answer_variants("How many dogs are there?", "three") == \
        ["three", "Three", " three", " Three", "3", " 3"]
    assert G2.answer_variants("How many dogs are there?", "eleven")[-2:] == ["other", " other"]
    assert G2.answer_variants("How many cats?", "Ten")[4] == "10"


def test_aggregate():
    assert G2.aggregate([0.25, 1.0]) == pytest.approx(0.5)
    assert G2.aggregate([0.25, 0.0]) == 0.0
    assert G2.aggregate([0.25, 1.0], "am") == pytest.approx(0.625)
    assert G2.aggregate([]) == -10.0
    with pytest.raises(ValueError):
        G2.aggregate([1.0], "hm")


class StubJudge:
    """Vocabulary of single characters + a few words; fixed next-token distribution per question."""

    def __init__(self, table):
        self.vocab = ["Yes", "yes", " Yes", " yes", "No", "3", " 3", "three", "Three", " three", " Three", "other",
                      " other", "1"]
        self.table = table
        self.asked = []

    def first_token_id(self, s):
        return self.vocab.index(s) if s in self.vocab else self.vocab.index("other")

    def next_token_probs(self, image, text):
        self.asked.append(text)
        p = torch.zeros(len(self.vocab))
        for tok, v in self.table.get(text, {}).items():
            p[self.vocab.index(tok)] = v
        return p


def test_geneval2_soft_tifa_with_stub_judge(tmp_path, monkeypatch):
    q1, q2 = "Is there a cat?", "How many dogs are there?"
    judge = StubJudge({q1 + " Answer in one word.": {"Yes": 0.5, " yes": 0.1, "No": 0.4},
                       q2 + " Answer in one word.": {"3": 0.2, "three": 0.3, "1": 0.5}})
    data = tmp_path / "merged.jsonl"
    rows = [{"prompt": "p1", "vqa_list": [[q1, "Yes"], [q2, "three"]]}, {"prompt": "p2", "vqa_list": []},
            {"prompt": "p1", "vqa_list": [[q1, "Yes"], [q2, "three"]]}]  # exact duplicate: fine
    data.write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.setenv("RTDMD_GENEVAL2_DATA_PATH", str(tmp_path))
    s = G2.GenEval2Scorer(judge)
    out = s(torch.rand(2, 3, 8, 8), ["p1", "p2"])
    assert out[0].item() == pytest.approx(math.sqrt(0.6 * 0.5))  # gm of (0.5+0.1) and (0.2+0.3)
    assert out[1].item() == -10.0
    assert judge.asked == [q1 + " Answer in one word.", q2 + " Answer in one word."]
    # metadata carrying a vqa_list bypasses the lookup; unknown prompts raise a KeyError
    out = s(torch.rand(1, 3, 8, 8), ["unseen"], [{"vqa_list": [[q1, "Yes"]]}])
    assert out.item() == pytest.approx(0.6)
    with pytest.raises(KeyError, match="no vqa_list"):
        s(torch.rand(1, 3, 8, 8), ["unseen"])


def test_geneval2_duplicate_quirk_and_conflicts(tmp_path):
    judge = StubJudge({"Is it? Answer in one word.": {"Yes": 0.3, "yes": 0.3}})
    s = G2.GenEval2Scorer(judge, vqa_map={"p": [["Is it?", "Yes"]]})
    assert s(torch.rand(1, 3, 4, 4), ["p"]).item() == pytest.approx(0.6)
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"prompt": "p", "vqa_list": [["a", "Yes"]]}) + "\n" +
                 json.dumps({"prompt": "p", "vqa_list": [["b", "Yes"]]}) + "\n")
    with pytest.raises(RewardInputError, match="twice"):
        G2.load_vqa_map([f])


def test_geneval2_missing_model_error(tmp_path):
    with pytest.raises(MissingCheckpointError, match="Qwen3-VL-8B-Instruct"):
        get_scorer("geneval2", ckpt_dir=tmp_path)


# ----------------------------------------------------------------------------- ImageReward

def test_imagereward_constants_and_diagonal():
    assert (REWARD_MEAN, REWARD_STD) == (0.16717362830052426, 1.0333394966054072)
    sq = torch.arange(9.0).reshape(3, 3)
    assert diagonal_of_square(sq.flatten(), 3).tolist() == [0.0, 4.0, 8.0]
    assert diagonal_of_square([1.0, 2.0], 2).tolist() == [1.0, 2.0]
    with pytest.raises(RuntimeError):
        diagonal_of_square([1.0] * 5, 2)


def test_imagereward_missing_package(tmp_path):
    if importlib.util.find_spec("ImageReward") is not None:
        pytest.skip("image-reward installed")
    (tmp_path / "ImageReward").mkdir()
    (tmp_path / "ImageReward" / "ImageReward.pt").write_bytes(b"x")
    (tmp_path / "ImageReward" / "med_config.json").write_text("{}")
    with pytest.raises(MissingBackendError, match=r"rtdmd\[imagereward\]"):
        get_scorer("imagereward", ckpt_dir=tmp_path, backend="image-reward")


def test_hpsv3_safetensors_rename_only_inside_context(tmp_path):
    import safetensors.torch as st

    H3.apply_transformers_patches()
    H3.apply_transformers_patches()  # idempotent
    f = tmp_path / "w.safetensors"
    st.save_file({"visual.a": torch.zeros(1), "model.b": torch.zeros(1), "lm_head.c": torch.zeros(1)}, str(f))
    assert set(st.load_file(str(f))) == {"visual.a", "model.b", "lm_head.c"}
    with H3.renaming_safetensors_keys():
        assert set(st.load_file(str(f))) == {"model.visual.a", "model.language_model.b", "lm_head.c"}
    assert set(st.load_file(str(f))) == {"visual.a", "model.b", "lm_head.c"}
