r"""The toy2d RTDMD proof (DESIGN.md §3, issue "Stage 2"): reward goes up, modes survive, and the
RL sampler is closer to the reward-tilted target than the cold-start student is.

Setting: the three toy2d classes (4 Gaussian modes each), training reward
``R(x) = Σ_k w_k r_k(x)`` with the weights of ``params.rl.reward_weights``
(``toy2d_target = −‖x − (2.5, 0.5)‖``, differentiable; ``toy2d_region = 1[x_0 > 0]``, not).

Samplers compared (per class, ``n`` samples, fixed seeds):

* ``teacher-50`` / ``teacher-4`` — the teacher with 50 / 4 Euler steps (η = 0, guidance 1);
* ``cold-start-4`` — the AC-DMD student (EMA LoRA of the stage-1 artifact), 4 CPS steps, η of the
  params (the reference samples stochastically, §12.13);
* ``RTDMD-4`` — the stage-2 artifact stacked on the cold start (``stack_chain``);
* ablations, each a full stage-2 run from the same cold start with one part removed:
  ``GRPO-only`` (``rl.last_step.loss=none``, ``rl.bp.enabled=false``), ``BP-only``
  (``rl.policy_gradient=false``), ``no final-step AC-DMD`` (``rl.last_step.loss=none``).

Metrics: mean ``R`` and each reward; mode coverage (fraction of a class's modes holding ≥ 2 % of
its samples, averaged over classes); SWD and MMD² to the reward-tilted target
``p(x|c)·exp(β R(x))/Z`` — sampled exactly by importance-resampling the known data law
(:func:`rtdmd.metrics.toy2d.tilted_target_samples`) — for every β of a small grid.  β is
not a config key (see :mod:`rtdmd.train.rl_core`): the reported ``β*`` is the grid value at
which RTDMD-4 is closest (SWD) to the tilted target; every sampler is then compared at ``β*``.

Claims checked by ``tests/train/test_rl_toy2d_proof.py`` (and printed by ``bench/toy2d_rl.py``):
``R(RTDMD-4) > R(teacher-50)``; ``coverage(RTDMD-4) ≥ 0.9·coverage(teacher-50)``;
``SWD(RTDMD-4, tilted β*) < SWD(cold-start-4, tilted β*)``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from rtdmd.backbones.toy2d import CLASS_NAMES, MODE_STD, class_modes
from rtdmd.metrics.toy2d import coverage, mmd, swd, tilted_target_samples
from rtdmd.sampling import generate, teacher_step_list

BETA_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
SWD_PROJECTIONS = 128
MMD_SAMPLES = 1000
RL_FAST = ("distributed.strategy=none", "rl.eval_interval=0", "rl.log_interval=1000000")
ABLATIONS: dict[str, tuple[str, ...]] = {
    "grpo_only": ("rl.last_step.loss=none", "rl.bp.enabled=false"),
    "bp_only": ("rl.policy_gradient=false",),
    "no_last_ac": ("rl.last_step.loss=none",),
}
LABELS = {
    "teacher50": "teacher-50", "teacher4": "teacher-4", "cold_start": "cold-start-4", "rtdmd": "RTDMD-4",
    "grpo_only": "GRPO only", "bp_only": "BP only", "no_last_ac": "no final-step AC-DMD",
    "tilted": "tilted target β*",
}


def reward_function(weights: dict[str, float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x [N, 2] -> R(x) = Σ w_k r_k(x)`` through the registered toy2d scorers."""
    from rtdmd.rewards import MultiScorer

    ms = MultiScorer(weights, batch_size=1 << 30)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return ms(x.float(), [CLASS_NAMES[0]] * x.shape[0])["mean"].double()

    return fn


def per_reward(weights: dict[str, float], x: torch.Tensor) -> dict[str, float]:
    from rtdmd.rewards import MultiScorer

    out = MultiScorer(weights, batch_size=1 << 30)(x.float(), [CLASS_NAMES[0]] * x.shape[0])
    return {k: float(v.mean()) for k, v in out.items()}


@torch.no_grad()
def sample_classes(backbone, net, *, n: int, seed: int, step_list: Sequence[float], eta: float,
                   teacher_mode: bool = False) -> dict[int, torch.Tensor]:
    return {c: generate(backbone, net, [name] * n, step_list=list(step_list), eta=eta, seed=seed + 104_729 * (c + 1),
                        teacher_mode=teacher_mode).float().cpu()
            for c, name in enumerate(CLASS_NAMES)}


def tilted_targets(weights: dict[str, float], betas: Sequence[float], n: int, seed: int) -> dict[float, dict[int, torch.Tensor]]:
    fn = reward_function(weights)
    return {b: {c: tilted_target_samples(c, fn, b, n, seed=seed + 31 * c) for c in range(len(CLASS_NAMES))}
            for b in betas}


def sampler_metrics(samples: dict[int, torch.Tensor], weights: dict[str, float],
                    targets: dict[float, dict[int, torch.Tensor]], seed: int) -> dict[str, float]:
    """Rewards, coverage and SWD to the tilted target for every β of ``targets`` (class means)."""
    allx = torch.cat(list(samples.values()))
    out = {("reward" if k == "mean" else f"reward/{k}"): v for k, v in per_reward(weights, allx).items()}
    out["coverage"] = sum(coverage(x, c) for c, x in samples.items()) / len(samples)
    stats = [mode_stats(x, c) for c, x in samples.items()]
    out["min_mode_mass"] = sum(s[0] for s in stats) / len(stats)
    out["spread"] = sum(s[1] for s in stats) / len(stats)
    for b, tgt in targets.items():
        out[f"swd@{b:g}"] = sum(swd(samples[c], tgt[c], num_projections=SWD_PROJECTIONS, seed=seed)
                                for c in samples) / len(samples)
    return out


def mode_stats(points: torch.Tensor, class_index: int) -> tuple[float, float]:
    """``(mass of the least populated mode, within-mode spread)`` of one class's samples.

    Spread = RMS distance to the nearest mode centre / (MODE_STD·√2): 1 for the data law, < 1
    when the sampler sharpens (collapses) the modes, > 1 when it blurs them.
    """
    modes = class_modes(class_index).float()
    d = torch.cdist(points.float(), modes)
    nearest = d.argmin(dim=1)
    mass = torch.bincount(nearest, minlength=modes.shape[0]).float() / max(points.shape[0], 1)
    spread = float(d.min(dim=1).values.pow(2).mean().sqrt()) / (MODE_STD * 2 ** 0.5)
    return float(mass.min()), spread


def mmd_at(samples: dict[int, torch.Tensor], target: dict[int, torch.Tensor], n: int) -> float:
    """Class-mean MMD² on the first ``n`` samples of each side (MMD is O(n²): subsampled)."""
    return sum(mmd(samples[c][:n], target[c][:n]) for c in samples) / len(samples)


def load_generator(backbone, artifact: str, backbone_name: str):
    """Base generator with every generator adapter of ``artifact``'s chain merged (oldest first)."""
    from rtdmd.lora.artifact import stack_chain
    from rtdmd.lora.core import merge_lora_into_base

    net = backbone.load_transformer("generator")
    for art in stack_chain(artifact, backbone=backbone_name):
        ad = art.adapters["generator"]
        merge_lora_into_base(net, ad.state, ad.scale)
    return net.eval()


def train_cold_start(out_dir: str | Path, *, overrides: Sequence[str] = ()) -> str:
    """A toy2d cold-start artifact from the stage-1 trainer (in-process); returns its path."""
    from rtdmd.eval.toy2d_proof import train_student

    return train_student(out_dir, ac=True, seed=0, overrides=overrides)


def train_rl(out_dir: str | Path, init: str, *, overrides: Sequence[str] = ()) -> tuple[str, dict]:
    """One in-process stage-2 run from ``init``; returns ``(artifact path, manifest)``."""
    from rtdmd.config import load_params
    from rtdmd.train.base import RunOptions
    from rtdmd.train.logging import NullLogger
    from rtdmd.train.rl import RLTrainer

    params = load_params("toy2d", [*RL_FAST, *overrides])
    manifest = RLTrainer(params, RunOptions(out=str(out_dir), init=init), logger=NullLogger()).run()
    return str(Path(out_dir) / "artifact"), manifest


def run_proof(workdir: str | Path, cold_start: str, *, variants: Sequence[str] = ("rtdmd", *ABLATIONS),
              n: int = 2000, seed: int = 0, betas: Sequence[float] = BETA_GRID, overrides: Sequence[str] = (),
              log=print) -> dict:
    """Train the requested stage-2 variants from ``cold_start`` and measure every sampler.

    Returns ``{"rows": {key: metrics}, "beta": β*, "timing": {variant: seconds}, "betas": grid}``.
    """
    from rtdmd.backbones import build_backbone
    from rtdmd.config import load_params

    params = load_params("toy2d", list(overrides))
    weights = dict(params.rl.reward_weights)
    backbone = build_backbone(params)
    teacher = backbone.load_transformer("teacher")
    sp = params.sampler
    targets = tilted_targets(weights, betas, n, seed=50_000 + seed)
    rows: dict[str, dict[str, float]] = {}
    samples: dict[str, dict[int, torch.Tensor]] = {}
    timing: dict[str, float] = {}
    s = 1_000 + seed

    def measure(key: str, x: dict[int, torch.Tensor]) -> None:
        samples[key] = x
        rows[key] = sampler_metrics(x, weights, targets, seed)

    measure("teacher50", sample_classes(backbone, teacher, n=n, seed=s, eta=0.0, teacher_mode=True,
                                        step_list=teacher_step_list(sp.teacher_steps)))
    measure("teacher4", sample_classes(backbone, teacher, n=n, seed=s, eta=0.0, teacher_mode=True,
                                       step_list=teacher_step_list(len(sp.step_list))))
    student = load_generator(backbone, cold_start, params.name)
    measure("cold_start", sample_classes(backbone, student, n=n, seed=s, eta=sp.eta, step_list=sp.step_list))
    for v in variants:
        t0 = time.time()
        extra = ABLATIONS.get(v, ())
        art, _ = train_rl(Path(workdir) / v, cold_start, overrides=[*overrides, *extra])
        timing[v] = time.time() - t0
        net = load_generator(backbone, art, params.name)
        measure(v, sample_classes(backbone, net, n=n, seed=s, eta=sp.eta, step_list=sp.step_list))
        log(f"{LABELS.get(v, v)}: reward {rows[v]['reward']:.3f} coverage {rows[v]['coverage']:.3f} "
            f"({timing[v]:.1f}s)")
    ref = "rtdmd" if "rtdmd" in rows else "cold_start"
    best = min(betas, key=lambda b: rows[ref][f"swd@{b:g}"])
    # an independent draw of the tilted target itself: its row is the finite-sample noise floor
    measure("tilted", tilted_targets(weights, [best], n, seed=90_000 + seed)[best])
    for key, r in rows.items():
        r["swd"] = r[f"swd@{best:g}"]
        r["mmd"] = mmd_at(samples[key], targets[best], min(n, MMD_SAMPLES))
        r["mmd@0"] = mmd_at(samples[key], targets[0.0], min(n, MMD_SAMPLES)) if 0.0 in targets else float("nan")
    return {"rows": rows, "beta": best, "betas": list(betas), "timing": timing, "weights": weights}


def check_claims(result: dict) -> dict[str, bool]:
    rows = result["rows"]
    r, t, c = rows["rtdmd"], rows["teacher50"], rows["cold_start"]
    return {
        "reward_above_teacher50": r["reward"] > t["reward"],
        "coverage_at_least_90pct_teacher50": r["coverage"] >= 0.9 * t["coverage"],
        "swd_to_tilted_below_cold_start": r["swd"] < c["swd"],
        "mmd_to_tilted_below_cold_start": r["mmd"] < c["mmd"],
    }


def format_table(result: dict) -> str:
    rows, beta = result["rows"], result["beta"]
    names = [k for k in LABELS if k in rows]
    rew = [k for k in next(iter(rows.values())) if k.startswith("reward/")]
    head = f"{'sampler':<22} {'reward':>8} " + " ".join(f"{k.split('/')[1]:>13}" for k in rew) + \
        f" {'coverage':>9} {'min mode':>9} {'spread':>7} {'SWD@β*':>8} {'MMD@β*':>9} {'SWD@β=0':>8}"
    lines = [f"reward R = " + " + ".join(f"{w:g}·{k}" for k, w in result["weights"].items()) +
             f";  tilted target p·exp(β R)/Z, best-fit β* = {beta:g} (grid {', '.join(f'{b:g}' for b in result['betas'])})",
             head, "-" * len(head)]
    for k in names:
        m = rows[k]
        lines.append(f"{LABELS[k]:<22} {m['reward']:>8.3f} " + " ".join(f"{m[x]:>13.3f}" for x in rew) +
                     f" {m['coverage']:>9.3f} {m['min_mode_mass']:>9.3f} {m['spread']:>7.3f} {m['swd']:>8.4f}"
                     f" {m['mmd']:>9.5f} {m['swd@0']:>8.4f}")
    grid = "SWD of RTDMD-4 over β: " + ", ".join(f"{b:g}: {rows['rtdmd'][f'swd@{b:g}']:.4f}"
                                                 for b in result["betas"]) if "rtdmd" in rows else ""
    if grid:
        lines.append(grid)
    if result.get("timing"):
        lines.append("train seconds: " + ", ".join(f"{LABELS.get(k, k)} {v:.1f}" for k, v in result["timing"].items()))
    return "\n".join(lines)
