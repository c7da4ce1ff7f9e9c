import json

import pytest
import torch

from rtdmd.backbones.digits_data import load_images, prompt_for, split_indices
from rtdmd.eval.digits_metrics import DigitsReference, frechet_distance
from rtdmd.rewards import get_scorer, list_scorers


def test_registered_as_image_rewards_logprob_differentiable_judge_not():
    infos = list_scorers()
    assert infos["digits_logprob"].differentiable and infos["digits_logprob"].domain == "image"
    assert not infos["digits_judge"].differentiable and infos["digits_judge"].domain == "image"


def test_classifiers_recognise_the_split_they_never_saw(digits_rewards):
    m = json.loads((digits_rewards / "rewards" / "metrics.json").read_text())
    assert m["classifier"]["train_split"] == "reward" and m["judge"]["train_split"] == "judge"
    assert m["classifier"]["heldout_accuracy"] > 0.95
    assert m["judge"]["heldout_accuracy"] > 0.9


def test_logprob_prefers_the_prompted_digit_and_has_a_gradient(digits_rewards):
    x, y = load_images(16)
    idx = split_indices("judge")[:40]  # images the reward classifier never saw
    imgs, labels = x[idx], y[idx]
    right = [prompt_for(int(c), 1) for c in labels]
    wrong = [prompt_for((int(c) + 1) % 10, 2) for c in labels]
    s = get_scorer("digits_logprob")
    r_right, r_wrong = s(imgs, right), s(imgs, wrong)
    assert (r_right <= 0).all() and r_right.mean() > -0.5 and r_wrong.mean() < -3
    inp = imgs.clone().requires_grad_(True)
    out = s.score_differentiable(inp, right)
    out.sum().backward()
    assert out.shape == (40,) and inp.grad.abs().sum() > 0
    judge = get_scorer("digits_judge")
    p = judge(imgs, right)
    assert ((p >= 0) & (p <= 1)).all() and p.mean() > 0.8
    with pytest.raises(Exception, match="exactly one digit"):
        s(imgs[:1], ["a cat"])


def test_frechet_distance_known_answers():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # N(0, I) vs N(m, 4I): |m|^2 + 3 * (1 + 4 - 2*2) = |m|^2 + 3
    m = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    assert frechet_distance(a, 2 * b + m) == pytest.approx(5.0 + 3.0, rel=0.05)


def test_reference_metrics_on_real_digits_are_near_perfect(digits_rewards):
    ref = DigitsReference(16)
    x, y = load_images(16)
    idx = split_indices("reward")  # the judge never saw these
    prompts = [prompt_for(int(c)) for c in y[idx]]
    ref.set_teacher(x[split_indices("judge")])
    out = ref.metrics(x[idx], prompts)
    assert out["mean"]["judge_accuracy"] > 0.9 and out["mean"]["class_coverage"] == 1.0
    collapsed = x[idx[:1]].expand(len(idx), -1, -1, -1)  # one image repeated: far from the data
    assert out["mean"]["fd_real"] < 0.1 * ref.metrics(collapsed, prompts)["mean"]["fd_real"]
    assert ref.metrics(collapsed, prompts)["mean"]["diversity"] < 1e-6
    assert 0.7 < out["mean"]["diversity"] < 1.3
    shuffled = [prompts[(i + 1) % len(prompts)] for i in range(len(prompts))]  # wrong labels
    assert ref.metrics(x[idx], shuffled)["mean"]["judge_accuracy"] < 0.3
