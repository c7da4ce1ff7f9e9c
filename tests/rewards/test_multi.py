"""MultiScorer: weighted sum, batching, lazy shared scorers, BP path, geneval details, routing."""

from __future__ import annotations

import pytest
import torch

from rtdmd.rewards import (MultiScorer, RewardRoutingError, UnknownRewardError, clear_scorer_cache,
                           route_rewards, shared_scorer)
from rtdmd.rewards import multi as M


def test_weighted_sum_and_batching(tiny_ckpt, images, prompts):
    clear_scorer_cache()
    ms = MultiScorer({"clipscore": 2.0, "hpsv2": 0.5, "aesthetic": 1.0}, ckpt_dir=tiny_ckpt, batch_size=2)
    assert M._CACHE == {}  # lazy: nothing built yet
    out = ms(images, prompts)
    assert set(out) == {"clipscore", "hpsv2", "aesthetic", "mean"}
    assert all(v.shape == (3,) and v.dtype == torch.float32 for v in out.values())
    torch.testing.assert_close(out["mean"], 2.0 * out["clipscore"] + 0.5 * out["hpsv2"] + out["aesthetic"])
    # batching does not change results
    out1 = MultiScorer({"clipscore": 2.0, "hpsv2": 0.5, "aesthetic": 1.0}, ckpt_dir=tiny_ckpt, batch_size=16)(
        images, prompts)
    for k in out:
        torch.testing.assert_close(out[k], out1[k], atol=1e-6, rtol=1e-6)
    # the single scorer on its own gives the same (both quantise to 8 bit first)
    torch.testing.assert_close(shared_scorer("clipscore", ckpt_dir=tiny_ckpt)(images, prompts), out["clipscore"])


def test_scorers_are_shared(tiny_ckpt):
    clear_scorer_cache()
    a = MultiScorer({"clipscore": 1.0}, ckpt_dir=tiny_ckpt)
    b = MultiScorer({"clipscore": 1.0, "hpsv2": 1.0}, ckpt_dir=tiny_ckpt)
    assert a.scorer("clipscore") is b.scorer("clipscore")
    assert len(M._CACHE) == 1  # hpsv2 not built until used
    with pytest.raises(UnknownRewardError, match="not part"):
        a.scorer("hpsv2")


def test_differentiable_subset_and_bp(tiny_ckpt, images, prompts):
    ms = MultiScorer({"pickscore": 1.0, "hpsv2": 1.0, "aesthetic": 1.0, "clipscore": 0.0}, ckpt_dir=tiny_ckpt)
    assert ms.differentiable_names() == ["pickscore", "hpsv2", "clipscore"]
    x = images.clone().requires_grad_(True)
    with pytest.warns(UserWarning, match="aesthetic"):
        out = ms.score_differentiable(x, prompts)
    assert set(out) == {"pickscore", "hpsv2", "mean"}  # zero weight skipped
    out["mean"].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_geneval_details_in_multiscorer(tiny_ckpt):
    ms = MultiScorer({"geneval": 1.0}, ckpt_dir=tiny_ckpt)
    md = [{"tag": "counting", "include": [{"class": "dog", "count": 2}]}] * 2
    out = ms(torch.rand(2, 3, 32, 32), ["two dogs"] * 2, md)
    for k in ("geneval", "accuracy", "strict_accuracy", "counting_accuracy", "position_strict_accuracy", "mean"):
        assert k in out and out[k].shape == (2,)
    assert out["position_accuracy"].tolist() == [-10.0, -10.0]


def test_bad_construction():
    with pytest.raises(UnknownRewardError, match="valid rewards: .*pickscore"):
        MultiScorer({"pick": 1.0})
    with pytest.raises(ValueError):
        MultiScorer({})
    with pytest.raises(ValueError, match="batch_size"):
        MultiScorer({"ocr": 1.0}, batch_size=0)
    with pytest.raises(UnknownRewardError, match="backends given"):
        MultiScorer({"ocr": 1.0}, backends={"geneval": "mmdet"})


def test_routing():
    r = route_rewards(["pickscore", "hpsv2", "geneval", "ocr"], ["drawbench", "geneval", "ocr"])
    assert r == {"drawbench": ["pickscore", "hpsv2"], "geneval": ["geneval"], "ocr": ["ocr"]}
    with pytest.raises(RewardRoutingError, match="'hpsv3'.*not available"):
        route_rewards(["hpsv3"], ["drawbench"])
    assert route_rewards(["pickscore"], ["mine"], {"pickscore": "mine"}) == {"mine": ["pickscore"]}
    with pytest.raises(UnknownRewardError):
        route_rewards(["nope"])
    with pytest.raises(RewardRoutingError, match="no dataset"):
        route_rewards(["toy2d_target"])
    assert route_rewards(["toy2d_target", "ocr"], default_dataset="prompt_file") == \
        {"prompt_file": ["toy2d_target"], "ocr": ["ocr"]}
