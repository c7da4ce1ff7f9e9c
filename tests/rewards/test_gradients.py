"""BP path: gradients w.r.t. the input image (tiny models, float64 finite differences)."""

from __future__ import annotations

import pytest
import torch

from rtdmd.rewards import get_scorer


def _fd_check(score_fn, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = score_fn(x)
    assert out.shape == (x.shape[0],) and out.requires_grad
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # directional finite difference along a fixed random direction, and along one pixel
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    eps = 1e-4
    with torch.no_grad():
        fd = (score_fn(x + eps * v).sum() - score_fn(x - eps * v).sum()) / (2 * eps)
    an = (g * v).sum()
    assert float(fd) == pytest.approx(float(an), rel=1e-4, abs=1e-8)
    idx = torch.nonzero(g.abs() == g.abs().max())[0].tolist()
    e = torch.zeros_like(x)
    e[tuple(idx)] = 1.0
    with torch.no_grad():
        fd1 = (score_fn(x + eps * e).sum() - score_fn(x - eps * e).sum()) / (2 * eps)
    assert float(fd1) == pytest.approx(float(g[tuple(idx)]), rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("name", ["pickscore", "clipscore", "hpsv2"])
def test_gradcheck_tiny(tiny_ckpt, name):
    s = get_scorer(name, ckpt_dir=tiny_ckpt)
    s.to(dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(2, 3, 40, 48, generator=gen, dtype=torch.float64)  # away from the [0,1] edges
    _fd_check(lambda t: s.score_differentiable(t, ["a red cat", "a dog"]), x)


def test_bp_and_eval_paths_agree_up_to_quantisation(tiny_scorers):
    """clipscore/hpsv2 use the same tensor transform on both paths: equal on 8-bit-exact inputs."""
    x = torch.randint(0, 256, (2, 3, 48, 40)).float() / 255
    for name in ("clipscore", "hpsv2"):
        s = tiny_scorers(name)
        torch.testing.assert_close(s.score_differentiable(x, ["a", "b"]).detach(), s(x, ["a", "b"]),
                                   atol=1e-5, rtol=1e-5)
    # pickscore: bicubic PIL (eval) vs bilinear tensor (BP) -> close but not identical
    s = tiny_scorers("pickscore")
    a, b = s.score_differentiable(x, ["a", "b"]).detach(), s(x, ["a", "b"])
    assert torch.isfinite(a).all() and (a - b).abs().max() < 0.5


class StubImageReward(torch.nn.Module):
    """Stands in for image-reward's model: ``score_gard(ids, mask, pixels)`` and ``blip.tokenizer``."""

    def __init__(self, tokenizer):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 8, stride=8)
        self.emb = torch.nn.Embedding(len(tokenizer), 4)
        self.head = torch.nn.Linear(4, 1)
        self.blip = type("Blip", (), {"tokenizer": tokenizer})()
        self.seen_shapes = []

    def score_gard(self, ids, mask, pixels):
        self.seen_shapes.append(tuple(pixels.shape))
        t = (self.emb(ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        i = self.conv(pixels).mean((2, 3))
        raw = self.head(torch.tanh(i + t))
        return (raw - 0.16717362830052426) / 1.0333394966054072


def test_imagereward_glue_grad_with_stub(tiny_ckpt):
    from rtdmd.rewards.imagereward import ImageRewardScorer
    from rtdmd.rewards.tiny import tiny_clip_tokenizer

    torch.manual_seed(0)
    s = ImageRewardScorer(StubImageReward(tiny_clip_tokenizer()))
    s.to(dtype=torch.float64)
    x = 0.2 + 0.6 * torch.rand(2, 3, 40, 56, dtype=torch.float64)
    _fd_check(lambda t: s.score_differentiable(t, ["a", "b"]), x)
    assert s.model.seen_shapes[-1] == (2, 3, 224, 224)  # bicubic resize to exactly 224, no crop
    out = s(x.float(), ["a", "b"])  # eval path: PIL resize + crop, pairwise
    assert out.shape == (2,) and out.dtype == torch.float32


def test_score_differentiable_rejects_bad_input(tiny_scorers):
    from rtdmd.rewards import RewardInputError

    s = tiny_scorers("clipscore")
    with pytest.raises(RewardInputError, match="float torch.Tensor"):
        s.score_differentiable([torch.rand(3, 8, 8)], ["a"])
    with pytest.raises(RewardInputError, match="2 images and 1 prompts"):
        s.score_differentiable(torch.rand(2, 3, 8, 8), ["a"])
