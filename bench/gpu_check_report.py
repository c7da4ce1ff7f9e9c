"""The GPU check's report: derived numbers (MFU, measured ÷ planned memory, failures, verdict) and
the Markdown rendering of ``gpu_check.json`` (``gpu_check.md``; committed as
``bench/gpu_results.md`` after a run on a real GPU)."""
from __future__ import annotations

from typing import Any

from bench.common import fmt, md_table


def summarise(rep: dict[str, Any]) -> None:
    """Fill MFU, memory ratios, the failure list and the verdict (in place; idempotent)."""
    peak = (rep.get("env") or {}).get("peak_tflops")
    for row in rep.get("stages", []):
        tf = row.get("achieved_tflops")
        row["mfu"] = tf / peak if (tf and peak) else None
        plan = row.get("plan") or {}
        measured = row.get("train_peak_gib")
        row["planned_gib"] = plan.get("peak_gib") if plan.get("status") == "ok" else None
        row["measured_over_planned"] = (measured / row["planned_gib"]) if (measured and row["planned_gib"]) else None
    failures = []
    for name, ph in rep.get("phases", {}).items():
        if ph.get("status") not in ("ok", None) and not str(ph.get("status")).startswith("skipped") \
                and name not in ("launch", "stages", "plan"):
            failures.append(f"{name}: {ph.get('error') or ph.get('status')}")
    if rep.get("env", {}).get("error"):
        failures.append(f"env: {rep['env']['error']}")
    for row in rep.get("prepare", []) + rep.get("launch", []) + rep.get("stages", []):
        name = row.get("job") or row.get("name")
        if row.get("status") in ("failed", "timeout (budget)"):
            failures.append(f"{name}: {row.get('error') or row.get('status')}")
    nccl = rep.get("nccl")
    if nccl and nccl.get("status") != "ok":
        failures.append(f"nccl: {nccl.get('error')}")
    rep["failures"] = failures
    skipped = [n for n, ph in rep.get("phases", {}).items() if str(ph.get("status", "")).startswith("skipped")]
    skipped += [r["job"] for r in rep.get("stages", []) if str(r.get("status", "")).startswith(("skipped", "not reached"))]
    rep["skipped"] = skipped
    rep["unavailable"] = [r["job"] for r in rep.get("stages", []) if r.get("status") == "unavailable"]
    rep["verdict"] = (f"{len(failures)} failure(s)" if failures else "all phases that ran passed") + \
        (f", {len(skipped)} skipped" if skipped else "") + \
        (f", {len(rep['unavailable'])} unavailable in this checkout" if rep["unavailable"] else "")


def _env_rows(env: dict[str, Any]) -> list[dict[str, Any]]:
    keys = ("gpu", "gpu_count", "gpu_memory_gib", "compute_capability", "multiprocessors", "driver", "torch",
            "torch_cuda", "nccl", "python", "peak_what", "peak_tflops")
    rows = [{"item": k, "value": env.get(k)} for k in keys if env.get(k) is not None]
    rows += [{"item": f"version {k}", "value": v or "missing"} for k, v in (env.get("versions") or {}).items()]
    rows += [{"item": f"API: {k}", "value": v} for k, v in (env.get("api") or {}).items()]
    return rows


def render_md(rep: dict[str, Any]) -> str:
    env = rep.get("env") or {}
    out = [f"# GPU check — {rep.get('mode')}", "",
           f"Started {rep.get('started_utc')} on `{rep.get('host')}`"
           f"{' (' + str(env.get('gpu')) + ')' if env.get('gpu') else ''}; elapsed {fmt(rep.get('elapsed_s'))} s "
           f"of a {fmt(rep.get('budget_s'))} s budget. Command: `{rep.get('command')}`.", "",
           f"**Verdict: {rep.get('verdict')}.**", ""]
    if rep.get("failures"):
        out += ["## Failures", ""] + [f"- {f}" for f in rep["failures"]] + [""]
    out += ["## Phases", "", md_table([{"phase": k, **{c: v.get(c) for c in ("status", "seconds", "reason", "error")}}
                                       for k, v in rep.get("phases", {}).items()],
                                      ["phase", "status", "seconds", "reason", "error"]), ""]
    out += ["## 1. Environment and matmul peak", "", md_table(_env_rows(env), ["item", "value"]), ""]
    nccl = rep.get("nccl") or {}
    out += ["## 2. Process group and all-reduce", "",
            md_table([{k: nccl.get(k) for k in ("status", "backend", "world", "device", "sum_correct",
                                                "seconds_per_allreduce", "bus_gbps", "error")}]) if nccl else
            "(not run)\n", ""]
    out += ["## 3–4. Stages: memory, FLOPs, MFU", "",
            md_table([{"job": r.get("job"), "status": r.get("status"), "world": r.get("world"),
                       "load peak GiB": r.get("load_peak_gib"), "train peak GiB": r.get("train_peak_gib"),
                       "planned GiB": r.get("planned_gib"), "measured/planned": r.get("measured_over_planned"),
                       "TFLOP/step": (r["flops_per_step"] / 1e12) if r.get("flops_per_step") else None,
                       "step s (median)": r.get("step_median_s"), "TFLOP/s": r.get("achieved_tflops"),
                       "MFU": r.get("mfu")} for r in rep.get("stages", [])]), ""]
    notes = [f"- {r['job']}: {r['status']} — {r.get('reason') or r.get('error')}" for r in rep.get("stages", [])
             if r.get("status") != "ok"]
    plans = sorted({f"{r['plan']['status']}: {r['plan'].get('detail', '')}".strip(": ")
                    for r in rep.get("stages", []) if r.get("plan") and r["plan"]["status"] != "ok"})
    out += notes + [f"- planner: {p}" for p in plans] + ([""] if notes or plans else [])
    out += ["MFU = FLOPs of one step (FlopCounterMode, per rank; includes the forwards recomputed by gradient "
            "checkpointing) ÷ median step time ÷ the matmul peak of section 1. Memory = "
            "`torch.cuda.max_memory_allocated` over model loading (load) and over the training steps (train).", ""]
    out += ["## 5. Stage commands under torchrun", "",
            md_table([{k: r.get(k) for k in ("name", "status", "seconds", "rc", "command", "reason", "error")}
                      for r in rep.get("launch", [])]) if rep.get("launch") else "(not run)\n", ""]
    return "\n".join(out)
