r"""Learned rewards of the ``digits`` known-answer problem (rewards.md §0 conventions).

Two classifiers of different families, trained here on disjoint halves of the scikit-learn digits
(:func:`rtdmd.backbones.digits_data.split_indices`); both see the image as grey 8×8
(:func:`~rtdmd.backbones.digits_data.to_grey8`, channel mean + area down-sampling: differentiable).

* ``digits_logprob`` (training reward, differentiable): a small CNN trained on the ``"reward"``
  split; ``r(x, p) = log softmax(f(x))[c(p)]`` with ``c(p)`` the digit the prompt names. Continuous,
  so it has headroom even where plain accuracy is saturated (the teacher's samples are already
  classified correctly; their log-probability is not at 0).
* ``digits_judge`` (held out, eval only): an MLP on the 64 pixels trained on the ``"judge"`` split,
  never used in training; ``r(x, p) = softmax(g(x))[c(p)]`` (probability of the prompted digit),
  so its mean is a soft per-class accuracy. Its hidden layer is also the feature space of the
  Fréchet distances (:mod:`rtdmd.eval.digits_metrics`).

Training (``python -m rtdmd.rewards.digits --out DIR``; DVC stage ``digits_rewards``): Adam, light
augmentation (Gaussian pixel noise σ = 0.05 for both, random ±1 px shifts of the 8×8 image for the
CNN only, so off-manifold generator samples do not get arbitrary scores), deterministic for the seed. Each classifier's
accuracy on the *other* split is written to ``metrics.json``.

Weights are ``safetensors``; the directory is resolved as ``ckpt_dir/digits`` when that exists,
else ``$RTDMD_DIGITS_REWARDS``, else ``data/digits/rewards``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rtdmd.backbones.digits_data import NUM_CLASSES, class_index_of, load_images, split_indices, to_grey8

DEFAULT_DIR = "data/digits/rewards"
FILES = {"classifier": "classifier.safetensors", "judge": "judge.safetensors"}


class DigitCNN(nn.Module):
    """Reward classifier: 2 conv layers + max-pool -> 64-d features -> 10 logits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, NUM_CLASSES)

    def features(self, g: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(g)))), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(g))


class DigitMLP(nn.Module):
    """Held-out judge: 64 pixels -> 128 -> 10 (another family than the CNN)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.head = nn.Linear(128, NUM_CLASSES)

    def features(self, g: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc1(g.flatten(1)))

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(g))


def _augment(g: torch.Tensor, gen: torch.Generator, shift: bool) -> torch.Tensor:
    b = g.shape[0]
    if not shift:
        return (g + 0.05 * torch.randn(g.shape, generator=gen)).clamp(0, 1)
    padded = F.pad(g, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (b,), generator=gen)
    dy = torch.randint(0, 3, (b,), generator=gen)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] for i in range(b)])
    return (out + 0.05 * torch.randn(out.shape, generator=gen)).clamp(0, 1)


def accuracy(model: nn.Module, g: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(g).argmax(1) == y).float().mean())


def train_classifier(kind: str, *, steps: int = 1500, batch_size: int = 64, lr: float = 2e-3, seed: int = 0):
    """Train ``kind`` (``"classifier"`` on the reward split, ``"judge"`` on the judge split)."""
    images, labels = load_images(8)
    g_all = to_grey8(images)
    split = "reward" if kind == "classifier" else "judge"
    idx = split_indices(split)
    g, y = g_all[idx], labels[idx]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        model = DigitCNN() if kind == "classifier" else DigitMLP()
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(steps):
            b = torch.randint(0, g.shape[0], (batch_size,), generator=gen)
            loss = F.cross_entropy(model(_augment(g[b], gen, shift=kind == "classifier")), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval().requires_grad_(False)
    other = split_indices("judge" if split == "reward" else "reward")
    return model, {"train_split": split, "train_accuracy": accuracy(model, g, y),
                   "heldout_accuracy": accuracy(model, g_all[other], labels[other])}


def build(out: str | Path, seed: int = 0) -> dict:
    from safetensors.torch import save_file

    from rtdmd.artifacts.fs import atomic_dir

    t0, w0 = time.process_time(), time.time()
    info: dict = {"seed": seed}
    models = {k: train_classifier(k, seed=seed + 10 * i) for i, k in enumerate(FILES)}
    with atomic_dir(out) as tmp:
        for kind, (model, metrics) in models.items():
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / FILES[kind]))
            info[kind] = metrics
        info["cpu_seconds"] = time.process_time() - t0
        info["wall_seconds"] = time.time() - w0
        (tmp / "metrics.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return info


def resolve_dir(ckpt_dir=None) -> Path:
    if ckpt_dir is not None and (Path(ckpt_dir) / "digits").is_dir():
        return Path(ckpt_dir) / "digits"
    return Path(os.environ.get("RTDMD_DIGITS_REWARDS", DEFAULT_DIR))


def load_model(kind: str, ckpt_dir=None, device="cpu") -> nn.Module:
    from safetensors.torch import load_file

    from rtdmd.rewards.errors import MissingCheckpointError

    path = resolve_dir(ckpt_dir) / FILES[kind]
    if not path.is_file():
        raise MissingCheckpointError(f"digits {kind} weights not found at {path}; build them with "
                          f"`dvc repro digits_rewards` (or `python -m rtdmd.rewards.digits --out {path.parent}`)")
    model = DigitCNN() if kind == "classifier" else DigitMLP()
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval().requires_grad_(False)


def _labels(prompts, device) -> torch.Tensor:
    return torch.tensor([class_index_of(p) for p in prompts], dtype=torch.long, device=device)


# Registry factories (registered in rtdmd.rewards.builtin); plain functions wrapped in FunctionScorer.
def logprob_fn(ckpt_dir=None, device="cpu"):
    model = load_model("classifier", ckpt_dir, device)

    def fn(images, prompts=None, metadata=None):
        g = to_grey8(images.to(device))
        return model(g).log_softmax(-1).gather(1, _labels(prompts, g.device)[:, None])[:, 0]

    return fn


def judge_fn(ckpt_dir=None, device="cpu"):
    model = load_model("judge", ckpt_dir, device)

    def fn(images, prompts=None, metadata=None):
        g = to_grey8(images.to(device))
        return model(g).softmax(-1).gather(1, _labels(prompts, g.device)[:, None])[:, 0]

    return fn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rtdmd.rewards.digits", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_DIR, help="output directory (written atomically)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    a = ap.parse_args(argv)
    if Path(a.out).exists() and any(Path(a.out).iterdir()) and not a.force:
        print(f"error: {a.out} exists; pass --force to rebuild it", file=sys.stderr)
        return 2
    info = build(a.out, a.seed)
    print(json.dumps(info, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
