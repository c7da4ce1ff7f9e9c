"""The toy2d proof (DESIGN.md §3): does the 4-step AC-DMD student match the 50-step teacher
better than the teacher's own 4-step Euler sampler does?

For every class ``c`` and seed: reference = 50-step Euler samples of the teacher (guidance 1);
candidates = teacher with 4 Euler steps (η = 0), the DMD-4 student and the AC-DMD-4 student (EMA
LoRA from the published artifact, CPS with ``sampler.eta``). Distances: sliced Wasserstein
(SWD) and MMD² (``rtdmd.metrics.toy2d``), averaged over the 3 classes and the seeds.
Each seed trains its own students (``cold_start.seed``) and draws its own samples.

Shared by ``tests/train/test_toy2d_proof.py`` and ``bench/toy2d_cold_start.py``.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from rtdmd.metrics.toy2d import class_distances, teacher_reference
from rtdmd.sampling import teacher_step_list

FAST = ("distributed.strategy=none", "cold_start.eval_interval=0", "cold_start.log_interval=100000")


def train_student(out_dir: str | Path, *, ac: bool, seed: int, overrides: Sequence[str] = ()) -> str:
    """Train a toy2d cold-start student in-process (single process); returns the artifact path."""
    from rtdmd.config import load_params
    from rtdmd.train.base import RunOptions
    from rtdmd.train.cold_start import ColdStartTrainer
    from rtdmd.train.logging import NullLogger

    params = load_params("toy2d", [*FAST, f"ac_dmd.enabled={str(ac).lower()}", f"cold_start.seed={seed}", *overrides])
    ColdStartTrainer(params, RunOptions(out=str(out_dir)), logger=NullLogger()).run()
    return str(Path(out_dir) / "artifact")


def load_student(backbone, params, artifact: str):
    from rtdmd.lora import inject_lora, load_lora_state
    from rtdmd.lora.artifact import load_lora_artifact

    ad = load_lora_artifact(artifact, backbone=params.name).adapters["generator"]
    net = backbone.load_transformer("generator")
    inject_lora(net, ad.targets, ad.rank, ad.alpha)
    load_lora_state(net, ad.state)
    return net.eval()


def _train_job(job: tuple[str, str, int, tuple[str, ...]]) -> tuple[str, float]:
    out, variant, seed, overrides = job
    torch.set_num_threads(1)
    t0 = time.time()
    art = train_student(out, ac=variant == "ac_dmd", seed=seed, overrides=overrides)
    return art, time.time() - t0


def proof_metrics(seeds: Sequence[int] = (0, 1), n_per_class: int = 2000, *, variants: Sequence[str] = ("ac_dmd", "dmd"),
                  overrides: Sequence[str] = (), workers: int = 1, workdir: str | None = None,
                  log=print) -> dict[str, dict[str, float]]:
    """``{"teacher4": {swd, mmd}, "dmd": {swd, mmd, train_seconds}, "ac_dmd": ...}`` averaged over seeds.

    Students train in ``workers`` parallel processes (one thread each); sampling and metrics run
    here. Everything is seeded, so the numbers do not depend on ``workers``.
    """
    from rtdmd.backbones import build_backbone
    from rtdmd.config import load_params

    params = load_params("toy2d", list(overrides))
    backbone = build_backbone(params)  # builds/caches the teacher before any worker starts
    teacher = backbone.load_transformer("teacher")
    sp = params.sampler
    sums: dict[str, dict[str, float]] = {}

    def add(key, d):
        for k, v in d.items():
            sums.setdefault(key, {}).setdefault(k, 0.0)
            sums[key][k] += v / len(seeds)

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        jobs = [(str(Path(tmp) / f"{v}-{s}"), v, s, tuple(overrides)) for s in seeds for v in variants]
        if workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
                done = list(pool.map(_train_job, jobs))
        else:
            done = [_train_job(j) for j in jobs]
        trained = {(j[1], j[2]): d for j, d in zip(jobs, done)}
        for seed in seeds:
            ref = teacher_reference(backbone, teacher, n_per_class, seed=1_000 + seed, steps=sp.teacher_steps)
            add("teacher4", class_distances(backbone, teacher, ref, teacher_step_list(len(sp.step_list)), 0.0,
                                            seed=2_000 + seed, teacher_mode=True))
            for variant in variants:
                art, secs = trained[(variant, seed)]
                d = class_distances(backbone, load_student(backbone, params, art), ref, list(sp.step_list), sp.eta,
                                    seed=2_000 + seed)
                log(f"seed {seed} {variant}: swd {d['swd']:.4f} mmd {d['mmd']:.4f} (trained in {secs:.1f}s)")
                add(variant, {**d, "train_seconds": secs})
    return sums


def format_table(results: dict[str, dict[str, float]]) -> str:
    names = {"teacher4": "teacher 4-step Euler", "dmd": "DMD-4 (plain)", "ac_dmd": "AC-DMD-4"}
    lines = [f"{'sampler':<22} {'SWD':>8} {'MMD':>8}", "-" * 40]
    for key in ("teacher4", "dmd", "ac_dmd"):
        if key in results:
            lines.append(f"{names[key]:<22} {results[key]['swd']:>8.4f} {results[key]['mmd']:>8.4f}")
    return "\n".join(lines)
