"""Files of the evaluation matrix and the inference CLI (rank 0 only).

* ``metadata.json`` (matrix) — the summary returned by ``run_matrix``: ``config`` (the resolved
  params), ``rewards`` (weight, dataset, training/held-out, available), ``training_rewards``,
  ``held_out_rewards``, ``datasets`` (source file, sha256, prompt count), ``settings``,
  ``variants.<name>`` (spec, kind, ``sampler`` settings, ``artifacts`` with manifest and file
  sha256s, ``scores``, ``num_images``, ``time_seconds_sum``, per-dataset scores, toy2d metrics),
  ``num_images``, ``time_seconds_sum``, ``scores`` (``{variant: scores}``) and ``files``.
* ``<variant>/metadata.json`` — the spec's per-run schema (data_and_eval.md §4.7): ``config``
  (the reference's InferenceConfig fields, filled from params and the variant), ``num_images``,
  ``time_seconds_sum``, ``scores`` (flat, with ``mean``), plus ``variant`` (spec, sampler
  settings, artifact checksums). Written with ``indent=2``; non-JSON values go through ``str()``.
* ``table.csv`` — one row per variant: sampler columns, ``train/<reward>`` columns, the training
  weighted sum, ``held_out/<reward>`` columns, the held-out weighted sum, ``mean`` (the weighted
  sum over every reward, as the reference's ``mean``), and for toy2d the distribution metrics.
* ``table.md`` — the same as separate tables: training rewards, held-out rewards, toy2d metrics.
* ``metrics.json`` + ``dvc_plots/<metric>.csv`` — DVC metrics (``{variant: {column: value}}``, the
  reward and metric columns of ``table.csv``) and one bar-plot file per column (``variant,value``), declared in
  the repository's ``dvc.yaml`` for the latest flow matrix (``dvc metrics show``, ``dvc plots show``).
* ``grid_<dataset>.png`` — fixed-seed samples (global indices 0…G-1, the same noise in every
  row), one row per variant; ``<variant>/grid_<dataset>.png`` the single row. toy2d: scatter
  panels (teacher reference, tilted target, each variant), points coloured by class.
* ``<variant>/<dataset>_<idx:06d>.png`` (images) or ``<variant>/points_<dataset>.csv`` (toy2d) and
  ``<variant>/scores_<dataset>.csv`` (per-sample scores).

Drawing uses PIL only.
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from rtdmd.config.typed import to_mapping
from rtdmd.eval.prompts import class_points, expand

CLASS_COLOURS = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
TOY_EXTENT = 3.5


def sanitise(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "dataset"


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if torch.is_tensor(o):
        return o.tolist()
    return str(o)


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _to_pil(img: torch.Tensor):
    from PIL import Image

    if img.dtype != torch.uint8:
        img = (img.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(img.permute(1, 2, 0).contiguous().numpy())


def save_png(img: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _to_pil(img).save(path)


# ----------------------------------------------------------------------------- config (spec §4.7)
def inference_config(params, variant, artifacts: Sequence[Mapping], *, weights: Mapping[str, float] | None = None,
                     reward_datasets: Mapping[str, str] | None = None, batch_size: int | None = None,
                     world_size: int = 1, samples_per_prompt: int = 1, seed: int | None = None,
                     eval_reward: bool = True) -> dict:
    """The reference's InferenceConfig fields, filled from our params and the variant."""
    return {
        "backbone": params.name,
        "pretrained_path": params.model.pretrained,
        "revision": params.model.revision,
        "generator_init": params.model.generator_init,
        "model_type": params.model.family,
        "dtype": params.model.dtype,
        "image_resolution": params.model.resolution,
        "mode": "normal" if variant.teacher_mode else "distilled",
        "role": variant.role,
        "lora_paths": [a["uri"] for a in artifacts],
        "lora_rank": [a["rank"] for a in artifacts],
        "lora_alpha": [a["alpha"] for a in artifacts],
        "num_steps": len(variant.step_list),
        "denoising_step_list": list(variant.step_list),
        "cps_eta": variant.eta,
        "guidance_scale": variant.guidance,
        "seed": params.eval.seed if seed is None else seed,
        "batch_size": params.eval.batch_size if batch_size is None else batch_size,
        "eval_reward": eval_reward,
        "reward_fn": dict(weights or {}),
        "reward_dataset_map": dict(reward_datasets or {}),
        "dataset_path": params.eval.datasets_root,
        "num_media_images": params.eval.num_prompts,
        "samples_per_prompt": samples_per_prompt,
        "distributed": world_size > 1,
        "world_size": world_size,
    }


def write_variant_metadata(vdir: Path, params, variant, entry: Mapping, summary: Mapping, weights: Mapping[str, float]) -> Path:
    settings = summary["settings"]
    cfg = inference_config(params, variant, entry["artifacts"], weights=weights,
                           reward_datasets={r: info["dataset"] for r, info in summary["rewards"].items()},
                           batch_size=settings["batch_size"], world_size=settings["world_size"],
                           samples_per_prompt=settings["samples_per_prompt"], seed=settings["seed"])
    doc = {"config": cfg, "num_images": entry["num_images"], "time_seconds_sum": entry["time_seconds_sum"],
           "scores": entry["scores"],
           "variant": {"name": variant.name, "spec": variant.spec, "kind": variant.kind, "sampler": entry["sampler"],
                       "artifacts": entry["artifacts"]}}
    for fam in KNOWN_ANSWER:
        if fam in entry:
            doc[fam] = entry[fam]
    return write_json(Path(vdir) / "metadata.json", doc)


# ----------------------------------------------------------------------------- per-sample files
def write_samples(vdir: Path, dataset: str, got, texts: Sequence[str], *, toy: bool, images: bool = True) -> None:
    """Per-sample scores CSV, plus a PNG per image (``images``) or a points CSV (toy2d, always)."""
    vdir = Path(vdir)
    vdir.mkdir(parents=True, exist_ok=True)
    prefix = sanitise(dataset)
    keys = list(got.scores)
    with open(vdir / f"scores_{prefix}.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "prompt", *keys])
        for row, i in enumerate(got.indices):
            w.writerow([i, texts[i], *[f"{float(got.scores[k][row]):.6g}" for k in keys]])
    if got.samples is None:
        return
    if toy:
        with open(vdir / f"points_{prefix}.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["index", "prompt", "x", "y"])
            for row, i in enumerate(got.kept):
                x, y = got.samples[row].tolist()
                w.writerow([i, texts[i], f"{x:.6f}", f"{y:.6f}"])
        return
    if not images:
        return
    for row, i in enumerate(got.kept):
        save_png(got.samples[row], vdir / f"{prefix}_{i:06d}.png")


# ----------------------------------------------------------------------------- grids
def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def image_grid(rows: Sequence[tuple[str, Sequence[torch.Tensor]]], cell: int | None = None, label_width: int = 120):
    """A labelled grid: one row per ``(label, [images])``; cells resized to ``cell`` pixels."""
    from PIL import Image, ImageDraw

    first = next((imgs[0] for _, imgs in rows if len(imgs)), None)
    if first is None:
        return None
    if cell is None:
        cell = int(min(max(first.shape[-1], 96), 256))
    cols = max(len(imgs) for _, imgs in rows)
    pad = 4
    canvas = Image.new("RGB", (label_width + cols * (cell + pad) + pad, len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    resample = Image.NEAREST if first.shape[-1] < cell else Image.BILINEAR
    for r, (label, imgs) in enumerate(rows):
        y = pad + r * (cell + pad)
        draw.text((4, y + cell // 2 - 6), label[:18], fill="black", font=font)
        for c, img in enumerate(imgs):
            canvas.paste(_to_pil(img).resize((cell, cell), resample), (label_width + pad + c * (cell + pad), y))
    return canvas


def scatter_panel(points_by_class: Mapping[int, torch.Tensor], title: str, size: int = 256, extent: float = TOY_EXTENT):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size + 16), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 2), title[:40], fill="black", font=_font())

    def px(x, y):
        return ((x + extent) / (2 * extent) * (size - 1), 16 + (extent - y) / (2 * extent) * (size - 1))

    x0, y0 = px(0, 0)
    draw.line([(0, y0), (size, y0)], fill=(220, 220, 220))
    draw.line([(x0, 16), (x0, size + 16)], fill=(220, 220, 220))
    draw.rectangle([0, 16, size - 1, size + 15], outline=(160, 160, 160))
    for c, pts in points_by_class.items():
        colour = CLASS_COLOURS[int(c) % len(CLASS_COLOURS)]
        for x, y in pts.tolist():
            if abs(x) <= extent and abs(y) <= extent:
                u, v = px(x, y)
                draw.point([(u, v), (u + 1, v), (u, v + 1), (u + 1, v + 1)], fill=colour)
    return img


def hstack(panels):
    from PIL import Image

    w = sum(p.width for p in panels) + 4 * (len(panels) + 1)
    h = max(p.height for p in panels) + 8
    canvas = Image.new("RGB", (w, h), "white")
    x = 4
    for p in panels:
        canvas.paste(p, (x, 4))
        x += p.width + 4
    return canvas


# ----------------------------------------------------------------------------- tables
def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


KNOWN_ANSWER = ("toy2d", "digits")  # per-variant metric groups of the known-answer backbones


def table_rows(summary: Mapping) -> tuple[list[str], list[dict]]:
    """CSV header and rows (see the module docstring for the columns)."""
    train, held = summary["training_rewards"], summary["held_out_rewards"]
    weights = {r: info["weight"] for r, info in summary["rewards"].items()}
    toy_keys: list[str] = []  # "<family>/<metric>" for the known-answer backbones (toy2d, digits)
    for e in summary["variants"].values():
        for fam in KNOWN_ANSWER:
            for k in (e.get(fam, {}) or {}).get("mean", {}):
                if f"{fam}/{k}" not in toy_keys:
                    toy_keys.append(f"{fam}/{k}")
    header = ["variant", "kind", "nfe", "eta", "guidance", "lora_stack",
              *[f"train/{r}" for r in train], "train/weighted_sum",
              *[f"held_out/{r}" for r in held], "held_out/weighted_sum", "mean",
              *toy_keys, "num_images", "time_seconds_sum"]
    rows = []
    for name, e in summary["variants"].items():
        s = e["scores"]
        row = {"variant": name, "kind": e["kind"], "nfe": e["sampler"]["num_steps"], "eta": e["sampler"]["eta"],
               "guidance": e["sampler"]["guidance"],
               "lora_stack": " + ".join(a.get("stage") or Path(a["uri"]).name for a in e["artifacts"]) or "-"}
        for group, names in (("train", train), ("held_out", held)):
            got = [r for r in names if r in s]
            for r in names:
                row[f"{group}/{r}"] = s.get(r)
            row[f"{group}/weighted_sum"] = float(sum(weights[r] * s[r] for r in got)) if got else None
        row["mean"] = s.get("mean")
        for key in toy_keys:
            fam, k = key.split("/", 1)
            row[key] = (e.get(fam) or {}).get("mean", {}).get(k)
        row["num_images"] = e.get("num_images")
        row["time_seconds_sum"] = e.get("time_seconds_sum")
        rows.append(row)
    return header, rows


def write_csv(path: Path, summary: Mapping) -> Path:
    header, rows = table_rows(summary)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


def dvc_metrics(summary: Mapping) -> dict[str, dict[str, float]]:
    """``{variant: {column: value}}``: the numeric, finite reward / metric columns of :func:`table_rows`."""
    header, rows = table_rows(summary)
    cols = [c for c in header if c not in ("variant", "kind", "nfe", "eta", "guidance", "lora_stack", "num_images",
                                           "time_seconds_sum")]  # rewards and quality metrics, not settings
    return {r["variant"]: {c: float(r[c]) for c in cols if isinstance(r.get(c), (int, float))
                           and not isinstance(r.get(c), bool) and math.isfinite(float(r[c]))} for r in rows}


def write_dvc_metrics(out_dir: Path, summary: Mapping) -> dict[str, str]:
    """``metrics.json`` and ``dvc_plots/<column>.csv`` (``variant,value`` per row) of the matrix."""
    out_dir = Path(out_dir)
    metrics = dvc_metrics(summary)
    write_json(out_dir / "metrics.json", metrics)
    plots = out_dir / "dvc_plots"
    plots.mkdir(parents=True, exist_ok=True)
    files = {"dvc_metrics": "metrics.json"}
    for col in dict.fromkeys(c for m in metrics.values() for c in m):
        name = f"dvc_plots/{sanitise(col.replace('/', '.'))}.csv"
        with open(out_dir / name, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["variant", "value"])
            w.writerows([v, m[col]] for v, m in metrics.items() if col in m)
        files[f"dvc_plot/{col}"] = name
    return files


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def markdown(summary: Mapping) -> str:
    header, rows = table_rows(summary)
    train, held = summary["training_rewards"], summary["held_out_rewards"]
    settings = summary["settings"]
    lines = [f"# Reward evaluation matrix — {summary['backbone']}", ""]
    ds_desc = ", ".join(f"`{ds}` ({d['num_prompts']} prompts × {d['samples_per_prompt']} from {Path(d['source']).name})"
                        for ds, d in summary["datasets"].items())
    lines += [f"Datasets: {ds_desc}. Seeds: eval.seed {settings['seed']} + sample index (the same noise in every "
              f"variant). World size {settings['world_size']}.", ""]
    if summary.get("unavailable_rewards"):
        lines += ["Unavailable (skipped): " + "; ".join(f"`{r}`: {m}" for r, m in summary["unavailable_rewards"].items()), ""]
    sampler_cols = ["variant", "kind", "nfe", "eta", "guidance", "lora_stack"]
    base = [[r[c] for c in sampler_cols] for r in rows]
    lines += ["## Training rewards", "",
              f"Rewards optimised in RL (`rl.reward_weights`): {', '.join(f'`{r}`' for r in train) or '(none)'}.", ""]
    if train:
        lines += [_md_table(sampler_cols + train + ["weighted sum"],
                            [b + [r[f"train/{x}"] for x in train] + [r["train/weighted_sum"]] for b, r in zip(base, rows)]), ""]
    lines += ["## Held-out rewards", "",
              "Rewards *not* used in training — a rise in the training rewards without one here is a sign of reward "
              f"hacking. Held out: {', '.join(f'`{r}`' for r in held) or '(none: every evaluated reward was used in training)'}.", ""]
    if held:
        lines += [_md_table(["variant"] + held + ["weighted sum"],
                            [[r["variant"]] + [r[f"held_out/{x}"] for x in held] + [r["held_out/weighted_sum"]] for r in rows]), ""]
    lines += ["## All rewards", "", "`mean` is the weighted **sum** Σ w·score over every evaluated reward (the reference's `mean`).", "",
              _md_table(["variant", "mean", "num_images", "time_seconds_sum"],
                        [[r["variant"], r["mean"], r["num_images"], r["time_seconds_sum"]] for r in rows]), ""]
    toy_cols = [c for c in header if c.startswith("toy2d/")]
    if toy_cols:
        toy = summary.get("toy2d", {})
        ref = toy.get("teacher_reference", {})
        lines += ["## toy2d distribution metrics", "",
                  f"SWD / MMD² to the {ref.get('steps')}-step teacher (CFG {ref.get('guidance')}, other seeds: the teacher "
                  f"row shows the sampling-noise floor) and to the reward-tilted target p(x|c)·exp(β r(x))/Z with r = "
                  f"{toy.get('tilt_reward')} for β in {toy.get('tilt_betas')}; coverage = fraction of modes hit "
                  "(averaged over classes; lower distances are better).", "",
                  _md_table(["variant"] + [c[len("toy2d/"):] for c in toy_cols],
                            [[r["variant"]] + [r[c] for c in toy_cols] for r in rows]), ""]
    digit_cols = [c for c in header if c.startswith("digits/")]
    if digit_cols:
        lines += ["## digits metrics (held-out judge)", "",
                  "Fréchet distance in the held-out judge's feature space to the teacher reference (other seeds) and to "
                  "the real digits, the judge's accuracy on the prompted digit (mean, worst class), class coverage "
                  "(digits recognised ≥ 50 %) and within-class diversity relative to the real digits "
                  "(rtdmd/eval/digits_metrics.py). Grid: `digits_grid.png`.", "",
                  _md_table(["variant"] + [c[len("digits/"):] for c in digit_cols],
                            [[r["variant"]] + [r[c] for c in digit_cols] for r in rows]), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- matrix files
def write_matrix(out_dir: Path, params, summary: dict, grids: Mapping[str, Mapping[str, Any]], datasets, k: int, *,
                 toy: bool, toy_ref: Mapping | None = None, grid_size: int = 8) -> dict[str, str]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for ds, by_variant in grids.items():
        if not by_variant:
            continue
        name = f"grid_{sanitise(ds)}.png"
        if toy:
            texts, _ = expand(datasets[ds], k)
            panels = []
            ref = (toy_ref or {}).get(ds, {})
            if ref.get("teacher"):
                panels.append(scatter_panel(ref["teacher"], f"teacher ref ({summary['toy2d']['teacher_reference']['steps']} steps)"))
            tilted = ref.get("tilted") or {}
            if tilted:
                b = 1.0 if 1.0 in tilted else max(tilted)
                panels.append(scatter_panel(tilted[b], f"tilted target beta={b:g}"))
            for vname, got in by_variant.items():
                panel = scatter_panel(class_points(got.samples, texts, got.kept), vname)
                panel.save(out_dir / vname / name)
                panels.append(panel)
            hstack(panels).save(out_dir / name)
        else:
            rows = []
            for vname, got in by_variant.items():
                imgs = [got.samples[r] for r, i in enumerate(got.kept) if i < grid_size] if got.samples is not None else []
                rows.append((vname, imgs))
                single = image_grid([(vname, imgs)])
                if single is not None:
                    single.save(out_dir / vname / name)
            grid = image_grid(rows)
            if grid is None:
                continue
            grid.save(out_dir / name)
        files[f"grid_{ds}"] = name
    write_csv(out_dir / "table.csv", summary)
    (out_dir / "table.md").write_text(markdown(summary) + "\n", encoding="utf-8")
    files.update(write_dvc_metrics(out_dir, summary))
    files.update({"table_csv": "table.csv", "table_md": "table.md", "metadata": "metadata.json"})
    files.update({f"variant/{v}": f"{v}/metadata.json" for v in summary["variants"]})
    summary["files"] = files
    doc = {"config": to_mapping(params), **summary}
    write_json(out_dir / "metadata.json", doc)
    return files


# ----------------------------------------------------------------------------- MLflow
def mlflow_runs(summary: Mapping) -> list[dict]:
    """One evaluation run per variant (DESIGN.md §4): ``{name, params, metrics, tags}``.

    Metrics are named after the rewards (one per reward, plus GenEval's extra keys, ``mean``,
    ``train_weighted_sum``, ``held_out_weighted_sum`` and toy2d's ``toy2d_*``), so MLflow's compare
    view over these runs is the evaluation matrix.
    """
    _, rows = table_rows(summary)
    by_name = {r["variant"]: r for r in rows}
    runs = []
    for name, e in summary["variants"].items():
        metrics = {k: float(v) for k, v in e["scores"].items() if v is not None}
        row = by_name[name]
        for key, col in (("train_weighted_sum", "train/weighted_sum"), ("held_out_weighted_sum", "held_out/weighted_sum")):
            if row.get(col) is not None:
                metrics[key] = float(row[col])
        for fam in KNOWN_ANSWER:
            for k, v in ((e.get(fam) or {}).get("mean") or {}).items():
                metrics[f"{fam}_{k}"] = float(v)
        metrics["time_seconds_sum"] = float(e.get("time_seconds_sum") or 0.0)
        metrics = {re.sub(r"[^A-Za-z0-9_\-. /]", "_", k): v for k, v in metrics.items()}
        params = {"variant": name, "spec": e["spec"], "kind": e["kind"], "nfe": e["sampler"]["num_steps"],
                  "step_list": ",".join(f"{s:g}" for s in e["sampler"]["step_list"]), "eta": e["sampler"]["eta"],
                  "guidance": e["sampler"]["guidance"], "backbone": summary["backbone"],
                  "lora_stack": " + ".join(a["uri"] for a in e["artifacts"]) or "none"}
        tags = {"rtdmd.eval.variant": name, "rtdmd.backbone": summary["backbone"],
                "rtdmd.eval.training_rewards": ",".join(summary["training_rewards"]),
                "rtdmd.eval.held_out_rewards": ",".join(summary["held_out_rewards"])}
        for i, a in enumerate(e["artifacts"]):
            tags[f"rtdmd.lora.{i}.manifest_sha256"] = a["manifest_sha256"]
        runs.append({"name": f"eval/{name}", "params": params, "metrics": metrics, "tags": tags})
    return runs


def log_to_mlflow(summary: Mapping, out_dir: str | Path | None = None, *, parent_run_id: str | None = None,
                  experiment: str | None = None) -> list[str]:
    """Log :func:`mlflow_runs` as (nested) runs; attaches each variant's directory and the tables.
    Call from rank 0 only. Returns the run ids."""
    import mlflow

    if experiment:
        mlflow.set_experiment(experiment)
    ids = []
    for run in mlflow_runs(summary):
        tags = dict(run["tags"])
        nested = mlflow.active_run() is not None  # child of the active (stage/flow) run
        if parent_run_id and not nested:
            tags["mlflow.parentRunId"] = parent_run_id
        with mlflow.start_run(run_name=run["name"], tags=tags, nested=nested) as r:
            mlflow.log_params(run["params"])
            mlflow.log_metrics(run["metrics"])
            if out_dir is not None:
                base = Path(out_dir)
                vdir = base / run["params"]["variant"]
                if vdir.is_dir():
                    mlflow.log_artifact(str(vdir / "metadata.json"))
                    for png in sorted(vdir.glob("grid_*.png")):
                        mlflow.log_artifact(str(png), artifact_path="grids")
                for name in ("table.csv", "table.md", "digits_grid.png"):
                    if (base / name).is_file():
                        mlflow.log_artifact(str(base / name))
            ids.append(r.info.run_id)
    return ids
