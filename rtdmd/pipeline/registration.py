"""The flow's ``register`` and ``end`` steps: the final artifact and evaluation summary on the
MLflow parent run, the final LoRA stack registered as the new ``candidate`` version
(:func:`rtdmd.registry.flow.register_from_flow`), and where to look afterwards."""
from __future__ import annotations

import json
from typing import Any, Mapping

from rtdmd.pipeline.context import RunContext
from rtdmd.registry.flow import register_from_flow


def register(ctx: RunContext, *, final: Mapping[str, Any] | None, cold_start: Mapping[str, Any] | None,
             matrix: Mapping[str, Any] | None, pathspec: str) -> dict[str, Any]:
    """Record the final artifact + evaluation summary on the parent run and register the final
    stack as a new ``candidate`` version; the registry's answer is recorded in the summary."""
    tr = ctx.tracker()
    parent = ctx.parent_run_id
    tags = {"metaflow.pathspec": pathspec, "metaflow.run_id": ctx.run_of(pathspec)}
    summary: dict[str, Any] = {"backbone": ctx.backbone, "logical_run_id": ctx.logical_run_id}
    if final:
        tags.update({"rtdmd.final_artifact_uri": final["uri"], "rtdmd.final_stage": final["manifest"].get("stage")})
        summary["final_artifact"] = {"uri": final["uri"], "manifest": final["manifest"]}
    if cold_start:
        tags["rtdmd.cold_start_artifact_uri"] = cold_start["uri"]
    if matrix:
        summary["eval"] = {"uri": matrix["uri"], "scores": matrix["scores"],
                           "training_rewards": matrix["training_rewards"], "held_out_rewards": matrix["held_out_rewards"]}
        flat = {}
        for variant, scores in matrix["scores"].items():
            for k, v in scores.items():
                if isinstance(v, (int, float)):
                    flat[f"eval/{variant}/{k}"] = float(v)  # "/": grouped in the MLflow UI
        tr.log_metrics(parent, flat)
    if final:
        summary["registry"] = register_from_flow(
            backbone=ctx.backbone, artifact_uri=final["uri"], manifest=final["manifest"],
            cold_start_uri=(cold_start or {}).get("uri"), eval_summary=summary.get("eval"), parent_run_id=parent,
            tracking_uri=ctx.tracking_uri, experiment=ctx.experiment, pathspec=pathspec, params=ctx.params)
    tr.set_tags(parent, tags)
    tr.log_text(parent, json.dumps(summary, indent=2, default=str), "summary.json")
    tr.finish(parent)
    return summary


def where_to_look(ctx: RunContext, matrix: Mapping[str, Any] | None) -> str:
    lay = ctx.layout()
    uri = ctx.tracking_uri
    lines = ["", "Where to look:",
             f"  artifacts : {lay.base}",
             f"  MLflow    : mlflow ui --backend-store-uri '{uri}' --host 127.0.0.1 --port 5000 --workers 1"
             if uri.startswith("sqlite") else f"  MLflow    : {uri}",
             f"              experiment '{ctx.experiment}', parent run {ctx.parent_run_id}"]
    if matrix:
        lines.append(f"  eval table: {matrix['uri']}/table.md")
        lines += ["", matrix["markdown"]]
    return "\n".join(lines)
