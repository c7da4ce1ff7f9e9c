"""The ``digits`` known-answer problem: data, prompts and splits (data_and_eval.md §4).

* Images: the 1,797 handwritten 8×8 digits shipped inside scikit-learn
  (``sklearn.datasets.load_digits``, grey levels 0..16), scaled to [0, 1], bilinearly upsampled to
  ``resolution`` px (16 by default) and replicated to RGB. Ink is bright on a dark background, as
  in the source data.
* Prompts: each class has :data:`PHRASINGS` (a few templates, with the digit as a word or as a
  numeral), so the text conditioning is real; :func:`class_index_of` maps any of them back to the
  class and the empty prompt to the unconditional index ``10``.
* Splits (deterministic, stratified by class, seed :data:`SPLIT_SEED`): ``"reward"`` trains the
  reward classifier, ``"judge"`` trains the held-out judge; the two are disjoint and together are
  every image. The VAE and the teacher are trained on all images (the generative model should
  match the real distribution, which is also the Fréchet reference).
"""
from __future__ import annotations

import re
from functools import lru_cache

import torch
import torch.nn.functional as F

NUM_CLASSES = 10
UNCOND_INDEX = NUM_CLASSES
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PHRASINGS = (
    "a handwritten digit {word}",
    "the number {word}",
    "a drawing of the digit {num}",
    "handwritten {num}",
    "digit {word}, written by hand",
)
EVAL_PHRASING = 0  # the phrasing of the evaluation prompts (one prompt per class)
SPLIT_SEED = 0
_WORD_RE = re.compile(r"\b(" + "|".join(WORDS) + r")\b")
_NUM_RE = re.compile(r"(?<![0-9])([0-9])(?![0-9])")


class DigitsPromptError(ValueError):
    """A prompt that names no digit (or more than one)."""


def prompt_for(cls: int, phrasing: int = EVAL_PHRASING) -> str:
    return PHRASINGS[phrasing].format(word=WORDS[cls], num=cls)


def all_prompts() -> list[str]:
    """Every phrasing of every class (class-major): the training prompt set."""
    return [prompt_for(c, p) for c in range(NUM_CLASSES) for p in range(len(PHRASINGS))]


def eval_prompts() -> list[str]:
    """One prompt per class (``PHRASINGS[EVAL_PHRASING]``), in class order."""
    return [prompt_for(c) for c in range(NUM_CLASSES)]


def class_index_of(prompt: str) -> int:
    """The digit a prompt names (word or numeral); ``""`` -> :data:`UNCOND_INDEX`."""
    text = prompt.strip().lower()
    if not text:
        return UNCOND_INDEX
    found = {WORDS.index(w) for w in _WORD_RE.findall(text)} | {int(n) for n in _NUM_RE.findall(text)}
    if len(found) != 1:
        raise DigitsPromptError(f"digits: prompt {prompt!r} must name exactly one digit 0-9 "
                                f"(e.g. {prompt_for(7)!r}); it names {sorted(found) or 'none'}")
    return found.pop()


@lru_cache(maxsize=1)
def _raw() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0  # [N, 8, 8] in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    return x, y


def load_images(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as RGB ``[N, 3, R, R]`` in [0, 1] and labels ``[N]``."""
    x, y = _raw()
    img = x[:, None]
    if resolution != 8:
        img = F.interpolate(img, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return img.clamp(0, 1).expand(-1, 3, -1, -1).contiguous(), y.clone()


def split_indices(name: str) -> torch.Tensor:
    """Indices of the ``"reward"`` or ``"judge"`` split (stratified halves, disjoint)."""
    if name not in ("reward", "judge"):
        raise ValueError(f"unknown digits split {name!r}; expected 'reward' or 'judge'")
    _, y = _raw()
    g = torch.Generator().manual_seed(SPLIT_SEED)
    out = []
    for c in range(NUM_CLASSES):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        half = idx.numel() // 2
        out.append(idx[:half] if name == "reward" else idx[half:])
    return torch.sort(torch.cat(out)).values


def to_grey8(images: torch.Tensor) -> torch.Tensor:
    """RGB images ``[B, 3, H, W]`` in [0, 1] -> grey 8×8 ``[B, 1, 8, 8]`` (channel mean, area
    downsampling); differentiable. The classifiers see this resolution, like the source data."""
    grey = images.float().mean(dim=1, keepdim=True)
    if grey.shape[-1] != 8 or grey.shape[-2] != 8:
        grey = F.adaptive_avg_pool2d(grey, (8, 8))
    return grey
