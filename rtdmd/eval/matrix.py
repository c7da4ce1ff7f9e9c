"""The reward evaluation matrix: model variants × rewards (data_and_eval.md §4.4–4.7).

``run_matrix(params, variants, out_dir, reward_names=None, **options) -> dict``

1. **Inputs first, models last.** Rewards are checked against the registry and routed to their
   datasets (``eval.reward_dataset_map``; the reference defaults otherwise), every routed dataset's
   prompts are loaded (first ``eval.num_prompts``), and every variant spec is parsed and its LoRA
   stack fetched and checksum-verified — so a missing dataset, an empty prompt file or a bad
   artifact fails in seconds, before any model is built. Scorers are then built (before seeding,
   as in the reference), then the backbone.
2. **Generation.** For each variant and each dataset (in order of first appearance of its rewards),
   every prompt is generated ``samples_per_prompt`` times (1 for images; 512 for toy2d points).
   Sample ``i`` of a dataset uses seed ``eval.seed + i`` through a per-sample noise generator, so
   the same index gets the same noise in every variant (paired comparison, fixed-seed grids) and
   a sample does not depend on batch size, world size or dataset order, up to the float rounding
   of batched kernels (a rare pixel may move by one grey level). Deviation: the reference draws
   noise from the global RNG batch by batch, so its images change with all three.
3. **Distribution** (``torchrun``): rank ``r`` takes samples ``r, r+W, r+2W, …`` — no duplicate
   padding — in batches of ``eval.batch_size``, scores them, and the per-sample scores (plus the
   images that are written) are gathered to rank 0, which writes every file. The returned dict is
   broadcast so every rank gets the same result.
4. **Scores** per variant (§4.6 per-reward-dataset mode): each reward is scored only on its own
   dataset's images with a single-reward scorer; per-key means ignore the −10 sentinels; extra
   keys (GenEval's accuracies) are copied, renamed ``{reward}_{key}`` on collision; ``mean`` is the
   weighted **sum** Σ w_r · score_r over the rewards that produced a value.
5. **Held-out report.** Rewards in ``rl.reward_weights`` are the *training* rewards; the others
   are *held out*; the table shows the two groups separately.
6. **toy2d** also reports, per class and averaged: SWD / MMD to the 50-step teacher (a separate
   reference set drawn with other seeds, so the teacher variant itself shows the sampling noise
   floor), SWD / MMD to the reward-tilted target ``p(x|c)·exp(β r(x))/Z`` for a small β grid
   (``r`` = the training reward combination), and mode coverage.

Files (rank 0, under ``out_dir``; see :mod:`rtdmd.eval.report`)::

    metadata.json            matrix summary: config, rewards (training / held out), datasets,
                             per-variant sampler settings, artifact checksums, scores, timings
    table.csv, table.md      variants × rewards (training | held out | mean [| toy2d metrics])
    grid_<dataset>.png       fixed-seed samples, one row per variant (toy2d: scatter panels)
    <variant>/metadata.json  the spec's per-run schema: config, num_images, time_seconds_sum, scores
    <variant>/<dataset>_<idx:06d>.png   every generated image (``save_images``; toy2d: points CSV)
"""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from rtdmd import dist as D
from rtdmd.backbones import backbone_domain
from rtdmd.dist import DistEnv
from rtdmd.progress import progress
from rtdmd.eval import digits_metrics, report
from rtdmd.eval.prompts import (EmptyPromptsError, EvalPrompts, MissingDatasetError, class_points, expand,
                                load_eval_prompts)
from rtdmd.eval.variants import (Variant, VariantError, build_variant_net, describe_artifact, even_step_list,
                                 parse_variants, resolve_lora_stack)

log = logging.getLogger("rtdmd.eval")

SENTINEL = -10.0
DEFAULT_TILT_BETAS = (0.0, 0.1, 0.25, 0.5, 1.0)  # the RL proof finds beta* in [0, 1]
TOY2D_SAMPLES_PER_PROMPT = 512
TEACHER_REF_SEED_OFFSET = 1_000_003


class EvalInputError(ValueError):
    """Bad evaluation input (rewards, routing, prompts, options); raised before any model loads."""


# ----------------------------------------------------------------------------- distributed
def dist_env(device: str | torch.device | None = None) -> DistEnv:
    """The process group of ``torchrun`` (initialised here when needed), or a single process."""
    return D.init_distributed(device=device)


def _gather(obj, env: DistEnv) -> list | None:
    return D.gather_object(obj)


def _broadcast(obj, env: DistEnv):
    return D.broadcast_object(obj)


def _barrier(env: DistEnv) -> None:
    D.barrier()


# ----------------------------------------------------------------------------- generation
@dataclass
class SampleSet:
    """The (gathered or local) output of one variant on one dataset."""

    indices: list[int]
    samples: torch.Tensor | None  # uint8 images [N,3,H,W] / float points [N,2] (only kept ones)
    kept: list[int]  # global indices of the rows of ``samples``
    scores: dict[str, torch.Tensor]  # key -> [N] in ``indices`` order
    time_seconds: float


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def generate_local(backbone, net, variant: Variant, texts: Sequence[str], *, seed: int, env: DistEnv,
                   batch_size: int, desc: str = "generate"):
    """This rank's share ``texts[rank::world]``: ``(global indices, outputs [n, ...] float, seconds)``.
    Rank 0 shows a progress bar of its share (samples/s, ETA; :mod:`rtdmd.progress`)."""
    from rtdmd.sampling import generate

    idx = list(range(env.rank, len(texts), env.world))
    outs, seconds = [], 0.0
    bar = progress(len(idx), desc, rank=env.rank, unit="sample")
    for s in range(0, len(idx), batch_size):
        chunk = idx[s:s + batch_size]
        t0 = time.perf_counter()
        x = generate(backbone, net, [texts[i] for i in chunk], step_list=variant.step_list, eta=variant.eta,
                     seed=[seed + i for i in chunk], guidance=variant.guidance, teacher_mode=variant.teacher_mode)
        if x.is_cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        outs.append(x.detach().float().cpu())
        bar.update(len(chunk))
    bar.close()
    out = torch.cat(outs) if outs else None
    return idx, out, seconds


def score_local(scorers: Mapping[str, Any], outputs: torch.Tensor | None, texts, metadata, idx) -> dict[str, torch.Tensor]:
    """Per-sample score dict over every reward routed to this dataset (keys renamed as in §4.6)."""
    result: dict[str, torch.Tensor] = {}
    if outputs is None or not idx:
        return result
    prompts = [texts[i] for i in idx]
    md = None if metadata is None else [metadata[i] for i in idx]
    for reward, multi in scorers.items():
        det = multi(outputs, prompts, md)
        for key, value in det.items():
            if key == "mean":
                continue
            name = key if (key == reward or key not in result) else f"{reward}_{key}"
            result[name] = value.detach().float().cpu().reshape(-1)
    return result


def run_dataset(backbone, net, variant: Variant, prompts: EvalPrompts, scorers: Mapping[str, Any], *,
                samples_per_prompt: int, seed: int, env: DistEnv, batch_size: int, keep: str,
                grid_size: int) -> SampleSet | None:
    """Generate + score one dataset on every rank; the gathered :class:`SampleSet` on rank 0."""
    texts, metadata = expand(prompts, samples_per_prompt)
    idx, outputs, seconds = generate_local(backbone, net, variant, texts, seed=seed, env=env, batch_size=batch_size,
                                           desc=f"eval {variant.name} / {prompts.dataset}")
    scores = score_local(scorers, outputs, texts, metadata, idx)
    if outputs is not None and outputs.dim() == 4:
        stored = to_uint8(outputs)
    else:
        stored = outputs
    # rows to send to rank 0: everything, or only the fixed-seed grid
    rows = [r for r, i in enumerate(idx) if keep == "all" or i < grid_size]
    kept = [idx[r] for r in rows]
    payload = {"idx": idx, "kept": kept, "samples": stored[rows] if (stored is not None and rows) else None,
               "scores": scores, "seconds": seconds}
    parts = _gather(payload, env)
    if not env.is_main:
        return None
    all_idx, all_kept, samples, keys, secs = [], [], [], {}, 0.0
    for part in parts:
        all_idx += part["idx"]
        all_kept += part["kept"]
        if part["samples"] is not None:
            samples.append(part["samples"])
        secs += part["seconds"]
        for k, v in part["scores"].items():
            keys.setdefault(k, {}).update(dict(zip(part["idx"], v.tolist())))
    order = sorted(all_idx)
    if order != list(range(len(texts))):
        raise RuntimeError(f"gathered samples {len(order)} do not cover the dataset ({len(texts)})")
    scores = {k: torch.tensor([d.get(i, float("nan")) for i in order], dtype=torch.float32) for k, d in keys.items()}
    if samples:
        cat = torch.cat(samples)
        perm = sorted(range(len(all_kept)), key=lambda r: all_kept[r])
        samples_t, kept_sorted = cat[perm], [all_kept[r] for r in perm]
    else:
        samples_t, kept_sorted = None, []
    return SampleSet(indices=order, samples=samples_t, kept=kept_sorted, scores=scores, time_seconds=secs)


def mean_ignoring_sentinel(values: torch.Tensor) -> float | None:
    v = values[torch.isfinite(values) & (values != SENTINEL)]
    return float(v.double().mean()) if v.numel() else None


# ----------------------------------------------------------------------------- setup helpers
def select_rewards(params, reward_names: Sequence[str] | None) -> dict[str, float]:
    from rtdmd.rewards import list_scorers

    infos = list_scorers()
    base = dict(params.eval.rewards)
    if reward_names:
        names = list(dict.fromkeys(reward_names))
        weights = {n: float(base.get(n, params.rl.reward_weights.get(n, 1.0))) for n in names}
    else:
        weights = {n: float(w) for n, w in base.items()}
    if not weights:
        raise EvalInputError(f"no rewards to evaluate: eval.rewards of '{params.name}' is empty and no reward names were given")
    unknown = [n for n in weights if n not in infos]
    if unknown:
        raise EvalInputError(f"unknown reward(s) {unknown}; valid rewards: {', '.join(infos)}")
    domain = backbone_domain(params.model.family)
    wrong = [n for n in weights if infos[n].domain != domain]
    if wrong:
        raise EvalInputError(f"reward(s) {wrong} score {infos[wrong[0]].domain}, but backbone '{params.name}' "
                             f"produces {domain}; valid {domain} rewards: "
                             f"{', '.join(n for n, i in infos.items() if i.domain == domain)}")
    return weights


def route(params, weights: Mapping[str, float]) -> dict[str, list[str]]:
    from rtdmd.rewards import RewardRoutingError, route_rewards

    try:
        return route_rewards(list(weights), reward_dataset_map=dict(params.eval.reward_dataset_map))
    except RewardRoutingError as exc:
        raise EvalInputError(f"{exc}; set eval.reward_dataset_map.<reward>=<dataset>") from None


def build_scorers(groups, weights, *, ckpt_dir, device, batch_size, allow_unavailable: bool):
    """``{dataset: {reward: MultiScorer}}`` with every scorer built now; unavailable ones recorded."""
    from rtdmd.rewards import MultiScorer

    scorers: dict[str, dict[str, Any]] = {}
    unavailable: dict[str, str] = {}
    for ds, rewards in groups.items():
        scorers[ds] = {}
        for r in rewards:
            multi = MultiScorer({r: weights[r]}, ckpt_dir=ckpt_dir, device=device, batch_size=batch_size)
            try:
                multi.scorer(r)
            except Exception as exc:  # noqa: BLE001 — reported, or re-raised below
                if not allow_unavailable:
                    raise
                unavailable[r] = f"{type(exc).__name__}: {exc}"
                log.warning("reward %s is unavailable and skipped: %s", r, unavailable[r])
                continue
            scorers[ds][r] = multi
    return scorers, unavailable


def aggregate_scores(sample_scores: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per-key means over all samples, ignoring the −10 sentinels (keys with no value dropped)."""
    out = {}
    for key, values in sample_scores.items():
        m = mean_ignoring_sentinel(values)
        if m is not None:
            out[key] = m
    return out


# ----------------------------------------------------------------------------- toy2d
def toy2d_tilted_targets(params, classes: Mapping[int, int], betas: Sequence[float], seed: int) -> dict:
    """``{beta: {class: samples}}`` of the reward-tilted target, ``r`` = the training rewards."""
    from rtdmd.metrics.toy2d import tilted_target_samples
    from rtdmd.rewards import MultiScorer, list_scorers

    infos = list_scorers()
    train = {n: w for n, w in params.rl.reward_weights.items() if n in infos and infos[n].domain == "points"}
    if not train:
        return {}
    multi = MultiScorer(train, batch_size=1 << 30)  # analytic rewards: one vectorised call

    def reward_fn(x):
        return multi(x.float(), [""] * x.shape[0])["mean"].double()

    return {float(b): {c: tilted_target_samples(c, reward_fn, float(b), n, seed=seed + c) for c, n in classes.items()}
            for b in betas}


def toy2d_metrics(points: Mapping[int, torch.Tensor], teacher_ref: Mapping[int, torch.Tensor],
                  tilted: Mapping[float, Mapping[int, torch.Tensor]]) -> dict[str, Any]:
    from rtdmd.metrics.toy2d import coverage, mmd, swd

    per_class: dict[str, dict[str, float]] = {}
    for c, x in points.items():
        row = {"swd_teacher": swd(x, teacher_ref[c]), "mmd_teacher": mmd(x, teacher_ref[c]),
               "coverage": coverage(x, c)}
        for b, targets in tilted.items():
            row[f"swd_tilted_beta_{b:g}"] = swd(x, targets[c])
            row[f"mmd_tilted_beta_{b:g}"] = mmd(x, targets[c])
        per_class[str(c)] = row
    keys = next(iter(per_class.values())).keys() if per_class else []
    avg = {k: float(sum(r[k] for r in per_class.values()) / len(per_class)) for k in keys}
    if tilted:
        best = min(tilted, key=lambda b: avg[f"swd_tilted_beta_{b:g}"])
        avg["best_tilt_beta"] = float(best)
    return {"mean": avg, "per_class": per_class}


# ----------------------------------------------------------------------------- the matrix
def run_matrix(params, variants, out_dir: str | Path, reward_names: Sequence[str] | None = None, *,
               reward_ckpt_dir: str | Path | None = None, device: str | torch.device | None = None,
               samples_per_prompt: int | None = None, save_images: bool = True, grid_size: int = 8,
               allow_unavailable: bool = False, tilt_betas: Sequence[float] | None = None,
               batch_size: int | None = None) -> dict:
    """Evaluate ``variants`` (specs, ``{name: spec}`` or :class:`Variant`) on the rewards of
    ``params.eval`` (or ``reward_names``) and write the matrix files under ``out_dir``.

    Returns (on every rank) the summary dict that is written to ``metadata.json``.
    """
    out_dir = Path(out_dir)
    toy = params.model.family == "toy2d"
    digits = digits_metrics.is_digits(params)  # digits: judge-based metrics + teacher reference
    k = int(samples_per_prompt or (TOY2D_SAMPLES_PER_PROMPT if toy else
                                   digits_metrics.SAMPLES_PER_PROMPT if digits else 1))
    if k < 1:
        raise EvalInputError(f"samples_per_prompt must be >= 1, got {k}")
    bs = int(batch_size or params.eval.batch_size)
    if bs < 1:
        raise EvalInputError(f"eval.batch_size must be >= 1, got {bs}")
    if grid_size < 0:
        raise EvalInputError(f"grid_size must be >= 0, got {grid_size}")
    betas = [float(b) for b in (DEFAULT_TILT_BETAS if tilt_betas is None else tilt_betas)]

    # 1. inputs (cheap, before any model)
    weights = select_rewards(params, reward_names)
    groups = route(params, weights)
    training = [r for r in weights if r in params.rl.reward_weights]
    held_out = [r for r in weights if r not in params.rl.reward_weights]
    datasets: dict[str, EvalPrompts] = {}
    for ds, rewards in groups.items():
        datasets[ds] = load_eval_prompts(params.eval.datasets_root, ds, params.eval.num_prompts, rewards=rewards)
        if len(datasets[ds]) == 0:
            raise EmptyPromptsError(f"dataset '{ds}' has no prompts after the cap eval.num_prompts={params.eval.num_prompts}")
    if toy:  # every toy2d prompt must name a class (fail before any model)
        from rtdmd.backbones.toy2d import class_index_of

        for ds, p in datasets.items():
            for text in p.prompts:
                try:
                    class_index_of(text)
                except Exception as exc:  # BackboneError
                    raise EvalInputError(f"dataset '{ds}' ({p.source}): {exc}") from None
    vlist = parse_variants(variants, params)
    stacks = {v.name: (resolve_lora_stack(v.lora_uris, params, follow_parents=v.follow_parents)
                       if v.kind == "lora" else []) for v in vlist}

    env = dist_env(device)
    try:
        # 2. scorers (before seeding, like the reference), then the backbone
        scorers, unavailable = build_scorers(groups, weights, ckpt_dir=reward_ckpt_dir, device=env.device,
                                             batch_size=bs, allow_unavailable=allow_unavailable)
        if unavailable:  # datasets whose rewards all failed are not generated
            datasets = {ds: p for ds, p in datasets.items() if scorers[ds]}
            if not datasets:
                raise EvalInputError(f"no reward could be built: {unavailable}")
        D.seed_everything(params.eval.seed, env.rank)
        from rtdmd.backbones import build_backbone

        backbone = build_backbone(params, device=env.device)
        seed = int(params.eval.seed)
        keep = "all" if (save_images or toy or digits) else "grid"

        summary: dict[str, Any] = {
            "backbone": params.name,
            "family": params.model.family,
            "rewards": {r: {"weight": weights[r], "dataset": ds, "training": r in params.rl.reward_weights,
                            "available": r not in unavailable}
                        for ds, rs in groups.items() for r in rs},
            "training_rewards": training,
            "held_out_rewards": held_out,
            "unavailable_rewards": unavailable,
            "datasets": {ds: {**p.describe(), "samples_per_prompt": k, "rewards": groups[ds]} for ds, p in datasets.items()},
            "settings": {"seed": seed, "batch_size": bs, "samples_per_prompt": k, "world_size": env.world,
                         "grid_size": grid_size, "save_images": save_images, "seeding": "per-sample: eval.seed + index",
                         "device": str(env.device)},
            "variants": {},
        }

        # toy2d references (teacher at eval.teacher_steps with CFG, other seeds; tilted targets)
        toy_ref: dict[str, Any] = {}
        dref = digits_metrics.DigitsReference(params.model.resolution, reward_ckpt_dir) if digits else None
        if toy or digits:
            ref_variant = Variant(name="_teacher_ref", kind="teacher",
                                  step_list=even_step_list(int(params.eval.teacher_steps)),
                                  eta=0.0, guidance=float(params.sampler.teacher_guidance))
            net = backbone.load_transformer("teacher")
            for ds, prompts in datasets.items():
                got = run_dataset(backbone, net, ref_variant, prompts, {}, samples_per_prompt=k,
                                  seed=seed + TEACHER_REF_SEED_OFFSET, env=env, batch_size=bs, keep="all",
                                  grid_size=grid_size)
                if env.is_main and digits:
                    dref.set_teacher(got.samples)
                elif env.is_main:
                    texts, _ = expand(prompts, k)
                    ref = class_points(got.samples, texts, got.kept)
                    counts = {c: int(x.shape[0]) for c, x in ref.items()}
                    toy_ref[ds] = {"teacher": ref,
                                   "tilted": toy2d_tilted_targets(params, counts, betas, seed + 17)}
            del net
            summary["toy2d"] = {"teacher_reference": {"steps": int(params.eval.teacher_steps),
                                                      "guidance": float(params.sampler.teacher_guidance),
                                                      "seed_offset": TEACHER_REF_SEED_OFFSET},
                                "tilt_betas": betas,
                                "tilt_reward": dict(params.rl.reward_weights),
                                "tilted_target": "importance resampling of exact data samples with weights exp(beta*r)"}

        grids: dict[str, dict[str, SampleSet]] = {ds: {} for ds in datasets}
        digit_rows: dict[str, Any] = {}
        total_images, total_time = 0, 0.0
        for v in vlist:
            net = build_variant_net(backbone, v, stacks[v.name])
            entry: dict[str, Any] = {"spec": v.spec, "kind": v.kind, "sampler": v.sampler_settings(),
                                     "artifacts": [describe_artifact(a).to_dict() for a in stacks[v.name]],
                                     "scores": {}, "per_dataset": {}}
            n_images, secs = 0, 0.0
            toy_metrics = {}
            for ds, prompts in datasets.items():
                got = run_dataset(backbone, net, v, prompts, scorers[ds], samples_per_prompt=k, seed=seed, env=env,
                                  batch_size=bs, keep=keep, grid_size=grid_size)
                if not env.is_main:
                    continue
                n_images += len(got.indices)
                secs += got.time_seconds
                ds_scores = aggregate_scores(got.scores)
                entry["per_dataset"][ds] = {"num_samples": len(got.indices), "time_seconds_sum": got.time_seconds,
                                            "scores": ds_scores}
                for key, val in ds_scores.items():
                    name = key if key not in entry["scores"] else f"{ds}_{key}"
                    entry["scores"][name] = val
                grids[ds][v.name] = got
                texts, _ = expand(prompts, k)
                if digits:
                    toy_metrics[ds] = dref.metrics(got.samples, [texts[i] for i in got.kept])
                    digit_rows[v.name] = (got.samples, [texts[i] for i in got.kept])
                    digits_metrics.write_grid(out_dir / v.name / "grid_digits_by_class.png", {v.name: digit_rows[v.name]})
                if toy:
                    pts = class_points(got.samples, texts, got.kept)
                    toy_metrics[ds] = toy2d_metrics(pts, toy_ref[ds]["teacher"], toy_ref[ds]["tilted"])
                report.write_samples(out_dir / v.name, ds, got, texts, toy=toy, images=save_images)
            if env.is_main:
                produced = [r for r in weights if r in entry["scores"]]
                entry["scores"]["mean"] = float(sum(weights[r] * entry["scores"][r] for r in produced))
                entry["num_images"] = n_images
                entry["time_seconds_sum"] = secs
                if digits and toy_metrics:
                    entry["digits"] = next(iter(toy_metrics.values()))
                if toy and toy_metrics:
                    keys = next(iter(toy_metrics.values()))["mean"].keys()
                    entry["toy2d"] = {"mean": {k2: float(sum(m["mean"][k2] for m in toy_metrics.values()) / len(toy_metrics))
                                               for k2 in keys},
                                      "per_dataset": toy_metrics}
                summary["variants"][v.name] = entry
                total_images += n_images
                total_time += secs
                report.write_variant_metadata(out_dir / v.name, params, v, entry, summary, weights)
                log.info("variant %s: %s", v.name, {k2: round(x, 4) for k2, x in entry["scores"].items()})
            del net
            gc.collect()
            if env.device.type == "cuda":
                torch.cuda.empty_cache()

        if env.is_main:
            summary["num_images"] = total_images
            summary["time_seconds_sum"] = total_time
            summary["scores"] = {name: e["scores"] for name, e in summary["variants"].items()}
            if digit_rows:
                summary["digits_grid"] = str(digits_metrics.write_grid(out_dir / "digits_grid.png", digit_rows))
            files = report.write_matrix(out_dir, params, summary, grids, datasets, k, toy=toy, toy_ref=toy_ref,
                                        grid_size=grid_size)
            summary["files"] = files
        summary = _broadcast(summary if env.is_main else None, env)
        _barrier(env)
        return summary
    finally:
        if env.initialized_here:
            D.teardown()


__all__ = ["run_matrix", "EvalInputError", "MissingDatasetError", "EmptyPromptsError", "VariantError",
           "DistEnv", "dist_env", "generate_local", "run_dataset", "expand", "to_uint8", "select_rewards", "route"]
