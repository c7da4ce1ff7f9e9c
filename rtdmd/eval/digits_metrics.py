r"""Metrics with a right answer on the ``digits`` backbone (data_and_eval.md §4.7 analogue of toy2d's).

All metrics read the images a variant generated for the class prompts (``samples_per_prompt``
images per digit) and use the **held-out judge** (:class:`rtdmd.rewards.digits.DigitMLP`, trained
on the other half of the data than the training reward, never used in training):

* ``fd_teacher``: Fréchet distance in the judge's 128-d feature space (tanh hidden layer) to a
  reference set of the teacher at ``eval.teacher_steps`` Euler steps with CFG
  ``sampler.teacher_guidance``, drawn with other seeds (so the teacher variant itself shows the
  sampling-noise floor); ``FD = ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2})``
  (covariances with ``1/(n−1)``, float64, the matrix square root by symmetric eigendecomposition).
  Pooled over all classes.
* ``fd_real``: the same distance to the real digits (all 1,797 images at the model resolution).
* ``judge_accuracy``: fraction of samples the judge labels as the prompted digit; per class in
  ``per_class`` and ``judge_accuracy_min`` (worst class).
* ``class_coverage``: fraction of the 10 digits whose samples the judge recognises at least half
  of the time.
* ``diversity``: mean over classes of the trace of the within-class feature covariance of the
  samples divided by that of the real digits of the class (1 ≈ as varied as the data; a collapsed
  class goes to 0).

``write_grid`` writes ``digits_grid.png``: one row per variant, one column per digit (the first
``per_class`` samples of each), upscaled so the 16 px digits are visible.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from rtdmd.backbones.digits_data import NUM_CLASSES, class_index_of, load_images, to_grey8

SAMPLES_PER_PROMPT = 20
MARKER = "digits.json"


def is_digits(params) -> bool:
    """A flux2_klein backbone whose pipeline directory was built by ``digits_build``."""
    return params.model.family == "flux2_klein" and (Path(params.model.pretrained) / MARKER).is_file()


def _unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


@torch.no_grad()
def judge_outputs(judge, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N,128], predicted labels [N])`` of the judge for images (uint8 or [0,1] float)."""
    g = to_grey8(_unit(images))
    feats = judge.features(g)
    return feats.double(), judge.head(feats).argmax(-1)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    ea, va = torch.linalg.eigh(sa)
    root_a = (va * ea.clamp(min=0).sqrt()) @ va.T
    mid = root_a @ sb @ root_a
    tr_sqrt = torch.linalg.eigvalsh((mid + mid.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(sa) + torch.trace(sb) - 2 * tr_sqrt)


class DigitsReference:
    """Judge + real-digit features, built once per evaluation."""

    def __init__(self, resolution: int, ckpt_dir=None):
        from rtdmd.rewards.digits import load_model

        self.judge = load_model("judge", ckpt_dir)
        images, labels = load_images(resolution)
        self.real_feats, _ = judge_outputs(self.judge, images)
        self.real_labels = labels
        self.teacher_feats: torch.Tensor | None = None

    def set_teacher(self, images: torch.Tensor) -> None:
        self.teacher_feats, _ = judge_outputs(self.judge, images)

    def metrics(self, images: torch.Tensor, prompts: Sequence[str]) -> dict:
        feats, pred = judge_outputs(self.judge, images)
        labels = torch.tensor([class_index_of(p) for p in prompts])
        per_class: dict[str, dict[str, float]] = {}
        for c in sorted(set(labels.tolist())):
            m = labels == c
            real_c = self.real_feats[self.real_labels == c]
            div = float(torch.trace(torch.cov(feats[m].T)) / torch.trace(torch.cov(real_c.T))) if m.sum() > 1 else 0.0
            per_class[str(c)] = {"judge_accuracy": float((pred[m] == c).double().mean()), "diversity": div}
        acc = [r["judge_accuracy"] for r in per_class.values()]
        out = {"fd_real": frechet_distance(feats, self.real_feats),
               "judge_accuracy": float((pred == labels).double().mean()),
               "judge_accuracy_min": min(acc),
               "class_coverage": sum(a >= 0.5 for a in acc) / NUM_CLASSES,
               "diversity": sum(r["diversity"] for r in per_class.values()) / len(per_class)}
        if self.teacher_feats is not None:
            out["fd_teacher"] = frechet_distance(feats, self.teacher_feats)
        return {"mean": out, "per_class": per_class}


def write_grid(path: str | Path, rows: Mapping[str, tuple[torch.Tensor, Sequence[str]]], per_class: int = 2,
               scale: int = 4) -> Path:
    """``rows``: ``{variant: (images [N,3,H,W] uint8/float, prompts [N])}`` -> one PNG grid."""
    from PIL import Image, ImageDraw

    names = list(rows)
    first = _unit(next(iter(rows.values()))[0])
    h = first.shape[-1] * scale
    label_w = 8 * max(len(n) for n in names) + 8
    canvas = Image.new("RGB", (label_w + NUM_CLASSES * per_class * h, len(names) * h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, name in enumerate(names):
        images, prompts = rows[name]
        images = _unit(images)
        draw.text((4, r * h + h // 2 - 5), name, fill="black")
        labels = [class_index_of(p) for p in prompts]
        for c in range(NUM_CLASSES):
            picks = [i for i, lab in enumerate(labels) if lab == c][:per_class]
            for j, i in enumerate(picks):
                arr = (images[i].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                tile = Image.fromarray(arr).resize((h, h), Image.NEAREST)
                canvas.paste(tile, (label_w + (c * per_class + j) * h, r * h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
