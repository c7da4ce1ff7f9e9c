"""Metrics with a right answer on toy2d (DESIGN.md §3).

* sliced Wasserstein distance (SWD): mean over random unit directions of the 1-D W1 between
  sorted projections (equal sample counts);
* MMD^2 with a sum of RBF kernels (bandwidths 0.1, 0.5, 2), unbiased estimator;
* mode coverage: fraction of a class's modes that receive at least ``min_frac`` of the samples
  of that class (nearest-mode assignment);
* reward-tilted target ``p(x|c) exp(beta r(x)) / Z``: sampled exactly by importance-resampling
  data samples with weights ``exp(beta r)`` (the data law is known in closed form);
* :func:`teacher_reference` / :func:`class_distances`: per-class reference sets of the teacher's
  many-step sampler and the mean SWD / MMD of a sampler to them.

Used by training (stage-1 evaluation) and by evaluation (proofs, the reward matrix) alike.
"""
from __future__ import annotations

from typing import Sequence

import torch

from rtdmd.backbones.toy2d import CLASS_NAMES, MODES_PER_CLASS, class_modes, sample_data
from rtdmd.sampling import generate, teacher_step_list


def swd(a: torch.Tensor, b: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    n = min(a.shape[0], b.shape[0])
    a, b = a[:n].double(), b[:n].double()
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(num_projections, 2, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    pa, _ = torch.sort(a @ dirs.T, dim=0)
    pb, _ = torch.sort(b @ dirs.T, dim=0)
    return float((pa - pb).abs().mean())


def mmd(a: torch.Tensor, b: torch.Tensor, bandwidths=(0.1, 0.5, 2.0)) -> float:
    a, b = a.double(), b.double()

    def k(x, y):
        d2 = torch.cdist(x, y) ** 2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    m, n = a.shape[0], b.shape[0]
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    term_a = (kaa.sum() - kaa.diagonal().sum()) / (m * (m - 1))
    term_b = (kbb.sum() - kbb.diagonal().sum()) / (n * (n - 1))
    return float(term_a + term_b - 2 * kab.mean())


def coverage(points: torch.Tensor, class_index: int, min_frac: float = 0.02) -> float:
    modes = class_modes(class_index).to(points)
    nearest = torch.cdist(points.float(), modes.float()).argmin(dim=1)
    counts = torch.bincount(nearest, minlength=MODES_PER_CLASS).float()
    return float((counts / max(points.shape[0], 1) >= min_frac).float().mean())


def tilted_target_samples(class_index: int, reward_fn, beta: float, n: int, seed: int = 0,
                          pool: int = 200_000) -> torch.Tensor:
    """``n`` samples of ``p(x|c) exp(beta r(x)) / Z`` by importance resampling ``pool`` data draws."""
    g = torch.Generator().manual_seed(seed)
    x = sample_data(torch.full((pool,), class_index, dtype=torch.long), g)
    logw = beta * reward_fn(x).double()
    w = torch.softmax(logw, dim=0)
    idx = torch.multinomial(w.float(), n, replacement=True, generator=g)
    return x[idx]


def class_prompts() -> list[str]:
    return list(CLASS_NAMES)


@torch.no_grad()
def teacher_reference(backbone, teacher, n_per_class: int, seed: int, steps: int = 50,
                      guidance: float = 1.0) -> dict[int, torch.Tensor]:
    """``{class: [n, 2]}`` samples of the teacher's ``steps``-step Euler sampler."""
    out = {}
    for c, name in enumerate(CLASS_NAMES):
        out[c] = generate(backbone, teacher, [name] * n_per_class, step_list=teacher_step_list(steps), eta=0.0,
                          seed=seed + 7919 * c, guidance=guidance, teacher_mode=True).float().cpu()
    return out


@torch.no_grad()
def class_distances(backbone, net, reference: dict[int, torch.Tensor], step_list: Sequence[float], eta: float,
                    seed: int, *, teacher_mode: bool = False, guidance: float = 1.0) -> dict[str, float]:
    """Mean SWD / MMD over classes between ``net``'s samples and ``reference``."""
    swds, mmds = [], []
    for c, ref in reference.items():
        x = generate(backbone, net, [CLASS_NAMES[c]] * ref.shape[0], step_list=list(step_list), eta=eta,
                     seed=seed + 104_729 * (c + 1), guidance=guidance, teacher_mode=teacher_mode).float().cpu()
        swds.append(swd(x, ref, seed=seed))
        mmds.append(mmd(x, ref))
    return {"swd": sum(swds) / len(swds), "mmd": sum(mmds) / len(mmds)}
