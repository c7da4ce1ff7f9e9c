"""Metaflow cards of the flow's training and evaluation steps (``@card(type="blank")``).

* training steps (``cold_start``, ``rl``; node 0): the stage's artifact and summary, loss and
  reward curves from the stage's ``metrics.jsonl`` (Vega-Lite charts), the last logged values,
  and fixed-seed samples — toy2d: scatter plots of 256 points per class drawn by the stage's
  generator (LoRA stack merged) with seeds ``0..N-1``; image backbones: the trainer's sample grids;
* ``eval_join``: the evaluation matrix (markdown tables: training vs held-out rewards), a bar chart
  per reward across variants, and the fixed-seed sample grid of every variant side by side.

The builders return lists of card components and never raise (a card must not fail a step: an
error becomes a line of text in the card); :func:`attach` appends them to ``current.card`` when
the step has a card.
"""
from __future__ import annotations

import importlib
import io
import json
import re
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from rtdmd.artifacts.store import is_s3, join, s3_client, split_s3
from rtdmd.config.schema import Params
from rtdmd.config.typed import from_mapping

if TYPE_CHECKING:
    from rtdmd.pipeline.context import RunContext

LOSS_KEY = re.compile(r"(loss|^generator/dmd$|^fake/ac$|^fake/consistency$)", re.I)
REWARD_KEY = re.compile(r"^(reward/|eval/)")
MAX_POINTS = 400
TOY_SEEDS = 256  # points per class in the toy2d training-card scatter


def _mf():
    from metaflow.cards import Image, Markdown, Table, VegaChart

    return Image, Markdown, Table, VegaChart


def attach(components: Sequence[Any]) -> None:
    """Append components to the current step's card (no-op without ``@card``)."""
    try:
        from metaflow import current

        card = current.card
    except Exception:  # noqa: BLE001 - not in a Metaflow task / no @card
        return
    for c in components:
        try:
            card.append(c)
        except Exception:  # noqa: BLE001
            pass


def read_metrics(stage_dir: str) -> list[dict]:
    """Rows of ``<stage_dir>/metrics.jsonl`` (local or S3); [] when missing."""
    try:
        if is_s3(stage_dir):
            bucket, key = split_s3(join(stage_dir, "metrics.jsonl"))
            text = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        else:
            p = Path(stage_dir) / "metrics.jsonl"
            if not p.is_file():
                return []
            text = p.read_text()
    except Exception:  # noqa: BLE001
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def curve_spec(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], title: str) -> dict:
    """A Vega-Lite line chart of ``keys`` over ``step`` (one colour per key; thinned to MAX_POINTS)."""
    stride = max(1, len(rows) // MAX_POINTS)
    values = [{"step": r["step"], "metric": k, "value": float(r[k])}
              for r in rows[::stride] for k in keys if isinstance(r.get(k), (int, float))]
    return {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "title": title, "width": 520, "height": 220,
            "data": {"values": values}, "mark": {"type": "line", "point": len(rows) < 40},
            "encoding": {"x": {"field": "step", "type": "quantitative"},
                         "y": {"field": "value", "type": "quantitative", "scale": {"zero": False}},
                         "color": {"field": "metric", "type": "nominal"}}}


def _png_image(pil, label: str):
    Image, *_ = _mf()
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return Image(src=buf.getvalue(), label=label)


def toy2d_scatter(params, artifact_uri: str | None, *, seeds: int = TOY_SEEDS, title: str = ""):
    """PIL scatter of ``seeds`` fixed-seed samples per class from the generator with ``artifact_uri``
    merged (None: the base generator)."""
    import torch

    # lazy below: torch; only a card that draws samples needs it
    from rtdmd.backbones import build_backbone
    from rtdmd.backbones.toy2d import CLASS_NAMES
    from rtdmd.eval import report
    from rtdmd.eval.variants import Variant, build_variant_net, resolve_lora_stack
    from rtdmd.sampling import generate

    torch.set_num_threads(1)
    bb = build_backbone(params)
    stack = resolve_lora_stack([artifact_uri], params) if artifact_uri else []
    s = params.sampler
    v = Variant(name="card", kind="lora" if stack else "generator", step_list=[float(x) for x in s.step_list],
                eta=float(s.eta), guidance=float(s.guidance))
    net = build_variant_net(bb, v, stack)
    pts = {}
    for c, name in enumerate(CLASS_NAMES):
        pts[c] = generate(bb, net, [name] * seeds, step_list=v.step_list, eta=v.eta, guidance=v.guidance,
                          seed=[c * seeds + i for i in range(seeds)], teacher_mode=v.teacher_mode).float()
    return report.scatter_panel(pts, title or f"seeds 0..{seeds * len(CLASS_NAMES) - 1}")


def warm_imports(ctx: RunContext) -> threading.Thread | None:
    """Start importing what :func:`training_card` will need for toy2d's scatter (torch, the
    backbone, the sampler) in a daemon thread of the step's process, so it overlaps the stage's
    training instead of following it; ``None`` for other backbones (their card reads PNGs).

    The step's process only waits on ``torchrun`` while the stage trains; importing torch there
    afterwards cost ~2.8 s of a toy2d training step's ~7 s after its worker exited
    (bench/runs/2026-12-06_orchestration.md). A failed import is ignored here: the card imports
    again and reports the error in its text."""
    if ctx.params.get("model", {}).get("family") != "toy2d":
        return None

    def load() -> None:
        try:
            for name in ("torch", "rtdmd.backbones", "rtdmd.eval.variants", "rtdmd.eval.report", "rtdmd.sampling"):
                importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the card's own import reports it
            pass

    thread = threading.Thread(target=load, name="rtdmd-card-imports", daemon=True)
    thread.start()
    return thread


def _params(ctx: RunContext):
    return from_mapping(Params, ctx.params, source="<flow params>")


def _error(what: str, exc: BaseException):
    _, Markdown, *_ = _mf()
    return Markdown(f"*{what} unavailable: `{type(exc).__name__}: {str(exc)[:300]}`*")


def training_card(ctx: RunContext, stage: str, out: Mapping[str, Any] | None, *, stage_dir: str | None = None,
                  node_index: int = 0, num_nodes: int = 1, samples: bool = True) -> list:
    """Components of a training step's card (see the module docstring)."""
    try:
        Image, Markdown, Table, VegaChart = _mf()
    except ImportError:
        return []
    if node_index != 0:
        return [Markdown(f"# {stage} — node {node_index} of {num_nodes}\nNode 0's card has the curves and samples.")]
    if out is None:
        return [Markdown(f"# {stage}\nNot run in this flow run (see `--stages`).")]
    comps: list = []
    m = out.get("manifest") or {}
    if stage_dir is None:
        stage_dir = ctx.layout().stage_dir(stage)
    comps.append(Markdown(
        f"# {stage} — {ctx.backbone}\n\n"
        f"artifact `{out.get('uri')}` · {m.get('steps')} steps · world size {m.get('world_size')} · "
        f"config hash `{str(m.get('config_hash'))[:12]}` · data version `{m.get('data_version')}` · "
        f"MLflow run `{out.get('mlflow_run_id')}`"))
    rows = read_metrics(stage_dir)
    if rows:
        keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k != "step"})
        losses = [k for k in keys if LOSS_KEY.search(k)]
        rewards = [k for k in keys if REWARD_KEY.search(k) and not k.endswith(("num_prompts", "group_size"))]
        for title, ks in (("losses", losses), ("rewards", rewards)):
            if ks:
                comps.append(VegaChart(curve_spec(rows, ks, f"{stage}: {title}")))
        last = rows[-1]
        comps.append(Markdown("## Last logged values"))
        comps.append(Table([[k, f"{last[k]:.5g}"] for k in keys if k in last and (k in losses or k in rewards)],
                           headers=["metric", f"step {last['step']}"]))
    else:
        comps.append(Markdown(f"*no metrics.jsonl under `{stage_dir}`*"))
    if m.get("metrics"):
        comps.append(Markdown("## Summary metrics (manifest)"))
        comps.append(Table([[k, f"{v:.5g}" if isinstance(v, float) else str(v)] for k, v in sorted(m["metrics"].items())],
                           headers=["metric", "value"]))
    if samples:
        comps.append(Markdown("## Fixed-seed samples"))
        try:
            params = _params(ctx)
            if params.model.family == "toy2d":
                comps.append(_png_image(toy2d_scatter(params, out.get("uri"), title=f"{stage} (seeds fixed)"),
                                        f"{stage}: {TOY_SEEDS} points per class, seeds fixed"))
            else:
                pngs = [] if is_s3(stage_dir) else sorted(Path(stage_dir).glob("samples/*.png"))[-4:] + \
                    sorted(Path(stage_dir).glob("*.png"))[-2:]
                from PIL import Image as PILImage

                for p in pngs:
                    comps.append(_png_image(PILImage.open(p), p.name))
                if not pngs:
                    comps.append(Markdown("*the trainer wrote no sample grids*"))
        except Exception as exc:  # noqa: BLE001 - a card never fails the step
            comps.append(_error("samples", exc))
    return comps


def _reward_chart(scores: Mapping[str, Mapping[str, float]], rewards: Sequence[str]) -> dict:
    values = [{"variant": v, "reward": r, "score": float(s[r])} for v, s in scores.items() for r in rewards
              if isinstance(s.get(r), (int, float))]
    return {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "title": "reward per variant",
            "data": {"values": values}, "mark": "bar", "width": 140, "height": 180,
            "encoding": {"column": {"field": "reward", "type": "nominal"},
                         "x": {"field": "variant", "type": "nominal", "sort": list(scores)},
                         "y": {"field": "score", "type": "quantitative", "scale": {"zero": False}},
                         "color": {"field": "variant", "type": "nominal"}},
            "resolve": {"scale": {"y": "independent"}}}


def eval_card(ctx: RunContext, matrix: Mapping[str, Any] | None,
              results: Sequence[Mapping[str, Any]] = ()) -> list:
    """Components of the ``eval_join`` card: the matrix tables, reward bars, fixed-seed grids."""
    try:
        Image, Markdown, Table, VegaChart = _mf()
    except ImportError:
        return []
    if not matrix:
        return [Markdown("# Evaluation\nNo evaluation in this flow run.")]
    comps: list = [Markdown(f"# Evaluation matrix — {ctx.backbone}\n\nmatrix `{matrix.get('uri')}` · "
                            f"MLflow runs: {', '.join(f'{k} `{v[:8]}`' for k, v in (matrix.get('mlflow_runs') or {}).items())}")]
    try:
        rows = matrix.get("rows") or []
        if rows:
            header = list(rows[0].keys())
            keep = [h for h in header if h not in ("lora_stack", "time_seconds_sum")]
            comps.append(Table([[("" if r.get(h) is None else (f"{r[h]:.4g}" if isinstance(r[h], float) else str(r[h])))
                                 for h in keep] for r in rows], headers=keep))
        if matrix.get("markdown"):
            comps.append(Markdown(matrix["markdown"]))
        rewards = list(matrix.get("training_rewards") or []) + list(matrix.get("held_out_rewards") or [])
        if matrix.get("scores") and rewards:
            comps.append(VegaChart(_reward_chart(matrix["scores"], rewards)))
    except Exception as exc:  # noqa: BLE001
        comps.append(_error("table", exc))
    try:
        comps += _eval_grids(results)
    except Exception as exc:  # noqa: BLE001
        comps.append(_error("sample grids", exc))
    return comps


def _eval_grids(results: Sequence[Mapping[str, Any]]) -> list:
    """One image per dataset: every variant's fixed-seed grid (same seeds) side by side."""
    from PIL import Image as PILImage

    from rtdmd.eval import report  # lazy: torch

    Image, Markdown, *_ = _mf()
    panels: dict[str, list] = {}
    for res in results:
        uri, name = str(res.get("uri", "")), res.get("name")
        if not uri or is_s3(uri) or not name:
            continue
        for png in sorted((Path(uri) / name).glob("grid_*.png")):
            panels.setdefault(png.stem[len("grid_"):], []).append(PILImage.open(png).convert("RGB"))
    out = []
    if panels:
        out.append(Markdown("## Fixed-seed samples (sample i uses seed eval.seed + i in every variant)"))
    for ds, imgs in panels.items():
        grid = report.hstack(imgs) if all(i.height == imgs[0].height for i in imgs) else _vstack(imgs)
        out.append(_png_image(grid, f"{ds}: " + ", ".join(r.get("name", "") for r in results)))
    return out


def _vstack(imgs):
    from PIL import Image as PILImage

    w = max(i.width for i in imgs)
    canvas = PILImage.new("RGB", (w, sum(i.height for i in imgs)), "white")
    y = 0
    for i in imgs:
        canvas.paste(i, (0, y))
        y += i.height
    return canvas


def safe(builder, *args, **kwargs) -> list:
    """``builder(*args, **kwargs)``, or a one-line error component (cards never fail a step)."""
    try:
        return builder(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        try:
            _, Markdown, *_ = _mf()
            return [Markdown(f"*card failed: `{type(exc).__name__}: {exc}`*\n\n```\n{traceback.format_exc()[-1500:]}\n```")]
        except Exception:  # noqa: BLE001
            return []
