"""Input validation, registry, errors (no model needed: a trivial registered scorer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import rtdmd.rewards as R
from rtdmd.rewards import (MultiScorer, RewardInputError, RewardNotDifferentiableError, UnknownRewardError,
                           get_scorer, list_scorers, register_scorer)
from rtdmd.rewards.base import RewardScorer, quantize_uint8, validate_images


class MeanScorer(RewardScorer):
    """Eval: mean pixel of the 8-bit image. Not differentiable."""

    name = "test_mean"

    def _score(self, batch, prompts, metadata):
        return [float(a.mean()) / 255.0 for a in batch.arrays]


register_scorer("test_mean", lambda **kw: MeanScorer(), differentiable=False, overwrite=True)
# a plain function factory in the "points" domain (the toy2d path)
register_scorer("test_points", lambda: (lambda x, p, m: -(x ** 2).sum(-1)), differentiable=True, domain="points",
                overwrite=True)


def test_list_scorers_has_the_nine_and_differentiable_subset():
    infos = list_scorers()
    for n in ["pickscore", "hpsv2", "hpsv3", "clipscore", "aesthetic", "imagereward", "ocr", "geneval", "geneval2"]:
        assert n in infos
    diff = {n for n, i in infos.items() if i.differentiable and i.domain == "image" and not n.startswith("test_")}
    assert diff == {"pickscore", "hpsv2", "clipscore", "imagereward", "digits_logprob"}
    assert infos["ocr"].default_backend == "rapidocr"
    assert infos["geneval"].backends == ("transformers", "mmdet")


def test_unknown_reward_and_backend():
    with pytest.raises(UnknownRewardError, match="valid rewards: .*clipscore"):
        get_scorer("pikscore")
    with pytest.raises(KeyError):
        get_scorer("nope")
    with pytest.raises(UnknownRewardError, match="valid backends: rapidocr, tesseract, paddleocr"):
        get_scorer("ocr", backend="easyocr")
    with pytest.raises(UnknownRewardError, match="valid rewards"):
        MultiScorer({"pickscore": 1.0, "bogus": 1.0})


@pytest.mark.parametrize("bad, msg", [
    (torch.rand(2, 64, 64, 3), "wrong shape"),
    (torch.rand(2, 1, 8, 8), "wrong shape"),
    (torch.rand(3, 8, 8), "wrong shape"),
    ((torch.rand(2, 3, 8, 8) * 255).to(torch.uint8), "integer dtype"),
    (torch.rand(2, 3, 8, 8) * 2 - 1, r"values in \["),
    (torch.full((2, 3, 8, 8), float("nan")), "NaN"),
    (torch.rand(0, 3, 8, 8), "empty"),
    ([], "empty list"),
    ([np.zeros((8, 8, 3), np.uint8)], "element 0"),
    (np.zeros((2, 8, 8, 3), np.float32), "numpy"),
    ("image.png", "str"),
])
def test_bad_images(bad, msg):
    s = get_scorer("test_mean")
    with pytest.raises(RewardInputError, match=msg) as ei:
        s(bad, ["a", "b"])
    assert "expected" in str(ei.value) or "NaN" in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_bad_prompts_and_metadata():
    s = get_scorer("test_mean")
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(RewardInputError, match="non-empty list of prompts"):
        s(x, [])
    with pytest.raises(RewardInputError, match="2 images and 1 prompts"):
        s(x, ["a"])
    with pytest.raises(RewardInputError, match="single str"):
        s(x, "a cat")
    with pytest.raises(RewardInputError, match="prompt 1"):
        s(x, ["a", 3])
    with pytest.raises(RewardInputError, match="metadata"):
        s(x, ["a", "b"], [{}])


def test_accepted_inputs_agree():
    s = get_scorer("test_mean")
    x = torch.rand(2, 3, 16, 20)
    q = quantize_uint8(x)
    pil = [Image.fromarray(a) for a in q]
    a, b, c = s(x, ["a", "b"]), s(pil, ["a", "b"]), s(q, ["a", "b"])
    assert a.dtype == torch.float32 and a.shape == (2,)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    # mixed sizes and modes in a PIL list are fine
    mixed = [Image.new("L", (10, 12), 128), Image.new("RGBA", (30, 7), (255, 0, 0, 255))]
    out = s(mixed, ["a", "b"])
    assert out.shape == (2,) and torch.isfinite(out).all()
    # slight overshoot from a VAE decode is clamped, not rejected
    s(torch.rand(1, 3, 4, 4) * 1.0005, ["a"])


def test_uint8_quantisation_rule():
    x = torch.tensor([0.0, 0.5 / 255, 1.49 / 255, 1.51 / 255, 0.999999, 1.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    q = quantize_uint8(x)[0, 0, :, 0]
    assert q.tolist() == [0, 0, 1, 2, 255, 255]  # round(x*255): 0.5 rounds half to even
    assert validate_images(x).arrays[0].dtype == np.uint8


def test_not_differentiable_error_names_scorer_and_lists_the_others():
    s = get_scorer("test_mean")
    with pytest.raises(RewardNotDifferentiableError) as ei:
        s.score_differentiable(torch.rand(1, 3, 8, 8), ["a"])
    msg = str(ei.value)
    assert "'test_mean'" in msg
    for n in ("pickscore", "hpsv2", "clipscore", "imagereward"):
        assert n in msg


def test_points_domain_function_factory():
    s = get_scorer("test_points")
    assert s.domain == "points" and s.differentiable and s.name == "test_points"
    pts = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    torch.testing.assert_close(s(pts, ["a", "b"]), torch.tensor([-5.0, 0.0]))
    x = pts.clone().requires_grad_(True)
    s.score_differentiable(x, ["a", "b"]).sum().backward()
    torch.testing.assert_close(x.grad, -2 * pts)
    with pytest.raises(RewardInputError, match=r"\[B,D\]"):
        s(torch.rand(2, 3, 8, 8), ["a", "b"])
    out = MultiScorer({"test_points": 2.0})(pts, ["a", "b"])
    torch.testing.assert_close(out["mean"], torch.tensor([-10.0, 0.0]))


def test_register_twice_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("test_mean", lambda: None, differentiable=False)


def test_public_api_names():
    for n in ("get_scorer", "list_scorers", "register_scorer", "MultiScorer", "RewardInputError",
              "RewardNotDifferentiableError", "UnknownRewardError"):
        assert hasattr(R, n)
    assert issubclass(R.UnknownRewardError, KeyError) and issubclass(R.UnknownRewardError, ValueError)
