"""The flow's evaluation steps: the matrix rows, one ``python -m rtdmd.eval`` per variant, and
the merge into the matrix files and one MLflow run per variant."""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from rtdmd.artifacts.store import fetch_dir, is_s3, publish_dir
from rtdmd.pipeline import datasets, launch as L
from rtdmd.pipeline.context import RunContext, StageError, cache_dir, repo_root
from rtdmd.pipeline.training import prompt_overrides


def eval_variants(ctx: RunContext, cold_start_uri: str | None, rl_uri: str | None) -> list[dict[str, str]]:
    """The matrix rows: teacher at its full NFE and at the student's NFE, cold start, cold start + RL."""
    p = ctx.params
    k = len(p["sampler"]["step_list"])
    n = int(p["eval"]["teacher_steps"])
    out = [{"name": f"teacher-{n}", "spec": f"teacher:steps={n}", "role": "teacher"}]
    if k != n:
        out.append({"name": f"teacher-{k}", "spec": f"teacher:steps={k}", "role": "teacher_few_step"})
    if cold_start_uri:
        out.append({"name": f"cold_start-{k}", "spec": f"lora:{cold_start_uri}", "role": "cold_start",
                    "artifact_uri": cold_start_uri})
    if rl_uri:
        out.append({"name": f"rtdmd-{k}", "spec": f"lora:{rl_uri}", "role": "rtdmd", "artifact_uri": rl_uri})
    return out


def run_eval_variant(ctx: RunContext, variant: Mapping[str, str], *, prep: Mapping[str, Any] | None,
                     pathspec: str) -> dict[str, Any]:
    """``python -m rtdmd.eval`` for one variant (its MLflow run is written by :func:`merge_eval`,
    so this step imports neither torch nor MLflow)."""
    lay = ctx.layout()
    dest = lay.eval_dir(variant["name"])
    local = Path(tempfile.mkdtemp(prefix="rtdmd-eval-")) / variant["name"] if is_s3(dest) else Path(dest)
    if local.exists():
        shutil.rmtree(local)  # a retried/resumed evaluation starts clean (it is deterministic)
    nproc, _ = ctx.stage_nproc("eval")
    cfg = ctx.params_file()
    args = ["--config", cfg, "--variant", f"{variant['name']}={variant['spec']}", "--out", str(local),
            *ctx.eval_args]
    ovr = prompt_overrides(ctx, prep, "eval")
    if ovr:
        args += ["--override", *ovr]
    t0 = time.time()
    try:
        L.run_stage("rtdmd.eval", args, stage=f"eval:{variant['name']}", nproc_per_node=nproc, cwd=str(repo_root()),
                    env=ctx.trainer_env(None), torch_run=False)
    finally:
        shutil.rmtree(Path(cfg).parent, ignore_errors=True)
    summary = json.loads((local / "metadata.json").read_text())
    summary.pop("config", None)
    if is_s3(dest):
        publish_dir(local, dest, {"kind": "rtdmd-eval", "variant": variant["name"]})
        shutil.rmtree(local.parent, ignore_errors=True)
    return {**dict(variant), "uri": dest, "summary": summary, "pathspec": pathspec, "seconds": time.time() - t0,
            "prep": dict(prep) if prep else None}


def merge_eval(ctx: RunContext, results: Sequence[Mapping[str, Any]], order: Sequence[str]) -> dict[str, Any]:
    """Join the per-variant evaluations: the matrix (JSON/CSV/Markdown) under ``<run>/eval/matrix``,
    one MLflow run per variant (a metric per reward) and the table on the parent run."""
    from rtdmd.eval import report  # lazy: torch; only the join step needs it

    by_name = {r["name"]: r for r in results}
    names = [n for n in order if n in by_name]
    if not names:
        raise StageError("evaluation produced no variant results")
    first = by_name[names[0]]["summary"]
    combined = {k: v for k, v in first.items() if k not in ("variants", "scores", "files", "num_images",
                                                              "time_seconds_sum")}
    combined["variants"] = {n: by_name[n]["summary"]["variants"][n] for n in names}
    combined["scores"] = {n: combined["variants"][n]["scores"] for n in names}
    _, rows = report.table_rows(combined)
    md = report.markdown(combined)
    lay = ctx.layout()
    tr = ctx.tracker()
    run_ids = {}
    for run in report.mlflow_runs(combined):
        name = run["params"]["variant"]
        res = by_name[name]
        run_id = tr.eval_run(ctx.parent_run_id, ctx.logical_run_id, name, tags={
            **ctx.tags(res["pathspec"], "eval"), **run["tags"], "rtdmd.eval.role": res.get("role"),
            "rtdmd.artifact_uri": res.get("artifact_uri"), "rtdmd.eval_dir": res["uri"]})
        try:
            tr.log_params(run_id, run["params"])
        except Exception:  # noqa: BLE001 - identical params already logged by an earlier attempt
            pass
        tr.log_metrics(run_id, {**run["metrics"], "eval_seconds": res.get("seconds", 0.0)})
        datasets.log_prepared(tr, run_id, res.get("prep"), "test", datasets.stage_datasets(ctx.params, "eval"))
        vdir = _local_eval_dir(res["uri"], name)
        if vdir is not None:
            files = [vdir / "metadata.json", *sorted(vdir.glob("grid_*.png"))]
            tr.log_files(run_id, [f for f in files if f.is_file()], "eval")
            # the fixed-seed sample grid of a trained stage also goes to that stage's run
            stage = {"cold_start": "cold_start", "rtdmd": "rl"}.get(res.get("role") or "")
            stage_run = tr.find_stage_run(ctx.logical_run_id, stage) if stage else None
            if stage_run:
                tr.log_files(stage_run, sorted(vdir.glob("grid_*.png")), "samples")
        tr.finish(run_id)
        run_ids[name] = run_id
    with tempfile.TemporaryDirectory(prefix="rtdmd-matrix-") as tmp:
        t = Path(tmp)
        (t / "matrix.json").write_text(json.dumps(combined, indent=2, default=str))
        report.write_csv(t / "table.csv", combined)
        (t / "table.md").write_text(md + "\n")
        report.write_dvc_metrics(t, combined)
        _refresh_dvc_latest(t)
        uri = lay.eval_dir("matrix")
        publish_dir(t, uri, {"kind": "rtdmd-eval-matrix", "variants": names})
        tr.log_table(ctx.parent_run_id, rows, "eval/matrix.json")
        tr.log_text(ctx.parent_run_id, md, "eval/matrix.md")
        tr.log_files(ctx.parent_run_id, [t / "table.csv"], "eval")
        tr.set_tags(ctx.parent_run_id, {"rtdmd.eval_matrix_uri": uri,
                                           "rtdmd.eval_runs": ",".join(run_ids[n] for n in names if n in run_ids)})
    return {"uri": uri, "rows": rows, "markdown": md, "scores": combined["scores"], "mlflow_runs": run_ids,
            "training_rewards": combined.get("training_rewards", []), "held_out_rewards": combined.get("held_out_rewards", [])}


DVC_LATEST = "runs/eval_latest"  # the dvc.yaml `metrics:` / `plots:` paths (the latest flow matrix)


def _refresh_dvc_latest(matrix_dir: Path) -> None:
    """Copy the matrix's DVC metrics and plot files to :data:`DVC_LATEST` of the checkout, so
    ``dvc metrics show`` / ``dvc plots show`` (and ``dvc metrics diff``) render this run's matrix."""
    root = repo_root()
    if not (root / "dvc.yaml").is_file():
        return
    dest = root / DVC_LATEST
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".eval_latest-", dir=dest.parent))
        shutil.copy2(matrix_dir / "metrics.json", tmp / "metrics.json")
        shutil.copytree(matrix_dir / "dvc_plots", tmp / "dvc_plots")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    except OSError as exc:  # a convenience copy: the matrix artifact holds the same files
        print(f"[rtdmd] warning: could not refresh {dest}: {exc}", file=sys.stderr)
        return
    print(f"[rtdmd] DVC metrics/plots of this matrix: {dest} (`dvc metrics show`, `dvc plots show`)", flush=True)


def _local_eval_dir(uri: str, name: str) -> Path | None:
    """The variant's own output directory (``<eval dir>/<variant>``), fetched when on S3."""
    try:
        base = fetch_dir(uri, cache_dir()) if is_s3(uri) else Path(uri)
    except Exception as exc:  # noqa: BLE001 - files are a convenience for the MLflow UI
        print(f"[rtdmd] warning: cannot fetch {uri} for MLflow: {exc}", file=sys.stderr)
        return None
    d = base / name
    return d if d.is_dir() else None
