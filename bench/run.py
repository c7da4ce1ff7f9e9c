"""``python -m bench.run`` (= ``make bench``): run the benchmark items, write ``bench/results.md``
and ``bench/results.json``, and refresh the README's "Benchmarks" section.

    python -m bench.run                       # everything (< 20 min on 2 shared cores)
    python -m bench.run --quick --only artifacts,resume --out /tmp/b   # small sizes, a subset

Items (issue 9), each run in its own child process (``python -m bench.<module>``; one JSON object
on its last stdout line), so memory, thread settings and FLOP counters never mix:

=================  =======================================================================
step_floor         step time ÷ sum of its unavoidable passes (cold start + RL; toy2d, tiny_flux2)
compute_eff        model FLOP/s of a training step ÷ dense fp32 matmul FLOP/s (same threads)
scaling            step time and peak RSS vs resolution, depth, batch, processes (+ exponents)
orchestration      toy2d flow wall time − time in training/eval code, per step and total
artifacts          LoRA artifact (FLUX.2-klein 4B, r=32) publish+fetch via the store vs raw boto3
resume             SIGKILL or SIGTERM + resume of a toy2d cold start: repeated steps / seconds vs interval
real_scale         per-GPU memory and step FLOPs of the real backbones at the reference scale
plan_validation    the planner's simulated peak memory against the CPU allocator on the same step
compiled           compiled ÷ eager step (regional torch.compile), per stage, sized tiny_flux2
toy2d_proofs       the trainer engineers' toy2d proof tables (bench/toy2d_cold_start.py, toy2d_rl.py)
=================  =======================================================================

``--quick`` shrinks every item (used by the smoke test); README is only rewritten by a full run
into the default output directory.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, child_env, fmt, md_table

ITEMS = {
    "step_floor": ("bench.step_floor", "1. Step cost vs floor", 600),
    "compute_eff": ("bench.compute_eff", "2. Compute efficiency", 600),
    "scaling": ("bench.scaling", "3. Scaling", 900),
    "orchestration": ("bench.orchestration", "4. Orchestration overhead", 1500),
    "artifacts": ("bench.artifacts_io", "5. Artifact throughput", 600),
    "resume": ("bench.resume", "6. Resume waste", 600),
    "real_scale": ("bench.real_scale", "7. Real-scale simulation (rtdmd plan)", 3600),
    "plan_validation": ("bench.plan_validation", "8. Planner: simulated vs measured peak", 900),
    "compiled": ("bench.compiled", "9. Compiled vs eager", 1500),
    "toy2d_proofs": (None, "toy2d proof tables (trainer engineers' scripts)", 1500),
}
DEFAULT_OUT = ROOT / "bench"
HISTORY = ROOT / "bench" / "history.jsonl"  # one line per full `make bench` run (targets only)
TARGETED = ("step_floor", "compute_eff", "orchestration", "artifacts", "resume", "compiled")
README_HEADING = "## Benchmarks"


def run_item(name: str, quick: bool, workdir: Path) -> dict:
    module, title, timeout = ITEMS[name]
    t0 = time.time()
    if module is None:
        res = run_toy2d_proofs(quick, workdir, timeout)
    else:
        cmd = [sys.executable, "-m", module, "--workdir", str(workdir)] + (["--quick"] if quick else [])
        try:
            p = subprocess.run(cmd, cwd=str(ROOT), env=child_env(threads=1), capture_output=True, text=True,
                               timeout=timeout)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            if p.returncode != 0 or not lines:
                res = {"error": f"rc={p.returncode}: {p.stderr[-1500:]}"}
            else:
                res = json.loads(lines[-1])
        except subprocess.TimeoutExpired:
            res = {"error": f"timed out after {timeout}s"}
    res.setdefault("title", title)
    res["item"] = name
    res["seconds"] = time.time() - t0
    return res


def run_toy2d_proofs(quick: bool, workdir: Path, timeout: float) -> dict:
    """Call the two proof scripts (their own defaults; --quick: tiny settings) and keep their tables."""
    out = {"title": "toy2d proof tables", "metric": "the trainer engineers' proof scripts (their own claims)",
           "value": None, "target": "see tables", "met": None, "threads": 1, "table": [], "text": {},
           "notes": ["both scripts with their own defaults" if not quick else
                     "--quick: tiny step counts, numbers not meaningful"]}
    runs = {
        "toy2d_cold_start": [sys.executable, "bench/toy2d_cold_start.py"]
        + (["--seeds", "0", "--n", "300", "cold_start.total_steps=100"] if quick else []),
        # a fresh workdir: the script resumes finished runs found in an existing one
        "toy2d_rl": [sys.executable, "bench/toy2d_rl.py", "--workdir",
                     tempfile.mkdtemp(prefix="toy2d_rl-", dir=workdir)]
        + (["--cold-start-steps", "100", "--samples", "300", "rl.epochs=4"] if quick else []),
    }
    for key, cmd in runs.items():
        t0 = time.time()
        try:
            p = subprocess.run(cmd, cwd=str(ROOT), env=child_env(threads=1), capture_output=True, text=True,
                               timeout=timeout)
            out["text"][key] = p.stdout.strip() if p.returncode == 0 else f"(failed rc={p.returncode}) {p.stderr[-800:]}"
        except subprocess.TimeoutExpired:
            out["text"][key] = f"(timed out after {timeout}s)"
        out["table"].append({"script": f"bench/{key}.py", "seconds": time.time() - t0,
                             "ok": not out["text"][key].startswith("(")})
        claims = re.search(r"claims: (.*)", out["text"][key])
        if claims:
            out["table"][-1]["claims"] = claims.group(1)[:300]
    return out


# ------------------------------------------------------------------------------------ reporting
def _met(v, r: dict | None = None) -> str:
    if v is None:
        return "n/a (table)"
    out = "**met**" if v else "**missed**"
    m = re.search(r"([0-9]+(?:\.[0-9]+)?)", str((r or {}).get("target", "")))
    val = (r or {}).get("value")
    if m and isinstance(val, (int, float)) and float(m.group(1)) > 0:
        if abs(float(val) / float(m.group(1)) - 1) <= 0.2:
            out += " (borderline: within 20% of the target, flips with machine load)"
    return out


def _value(r: dict) -> str:
    v = r.get("value")
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt(x, 2)}" for k, x in v.items())
    return fmt(v)


def headline(r: dict) -> str:
    """One line per item for the README: the numbers behind met/missed."""
    try:
        it = r["item"]
        if it == "step_floor":
            d = {(x["model"].split(" ")[0] + (" sized" if "sized" in x["model"] else ""), x["stage"]): x["ratio"]
                 for x in r["details"]}
            parts = []
            for m in ("toy2d", "tiny_flux2", "tiny_flux2 sized"):
                if (m, "cold_start") in d:
                    parts.append(f"{m} {d[(m, 'cold_start')]:.2f} / {d[(m, 'rl')]:.2f}")
            return "ratio cold start / RL: " + "; ".join(parts)
        if it == "compute_eff":
            d = r["details"][0]
            return (f"{d['achieved_gflops']:.0f} GFLOP/s model vs {d['matmul_gflops_median']:.0f} GFLOP/s matmul "
                    f"({d['gflop_per_step']:.0f} GFLOP/step, {d['threads']} thread)")
        if it == "scaling":
            return "time ∝ x^a: " + ", ".join(f"{k} {v['time_exponent']:.2f}" for k, v in r["fits"].items())
        if it == "orchestration":
            worst = max(r["table"], key=lambda x: x["overhead s"])
            return (f"worst step {worst['step']} {worst['overhead s']:.1f} s, mean {r['mean_step_overhead_s']:.1f} s/step, "
                    f"total {r['total_overhead_s']:.0f} s of a {r['run_wall_s']:.0f} s run ({r['mode']})")
        if it == "artifacts":
            st, raw = r["table"]
            return (f"{r['artifact']['artifact_bytes_on_disk'] / 1e6:.0f} MB: store {st['publish+fetch s (median)']:.1f} s "
                    f"vs raw {raw['publish+fetch s (median)']:.1f} s per publish+fetch")
        if it == "resume":
            w = max(r["details"], key=lambda x: x["repeated_intervals"])
            term = [x["repeated_steps"] for x in r["details"] if x.get("signal") == "SIGTERM"]
            return (f"SIGKILL: worst {w['repeated_steps']}/{w['interval']} steps ({w['repeated_s']:.1f} s of a "
                    f"{w['interval_s']:.1f} s interval) repeated; SIGTERM: {max(term, default=0)} steps repeated; "
                    f"losses reproduced: {all(x['repeated_steps_reproduce_losses'] for x in r['details'])}; restart "
                    f"{w['restart_overhead_s']:.0f} s")
        if it == "real_scale":
            bad = [f"{x['backbone']} {x['stage']} {x['peak GiB']:.0f} GiB" for x in r["table"]
                   if "peak GiB" in x and not x["fits 80 GiB −10%"]]
            return (f"{r['value']} simulated configs fit 80 GiB/GPU with 10% headroom"
                    + (f"; not: {', '.join(bad)}" if bad else ""))
        if it == "compiled":
            return "compiled ÷ eager: " + ", ".join(
                f"{x['stage']} {x['ratio']:.2f} (warm-up {x['warm-up s']:.0f} s, {x['recompiles after warm-up']} recompiles)"
                for x in r["table"])
        if it == "toy2d_proofs":
            return "; ".join(f"{x['script']}: {'ok' if x['ok'] else 'FAILED'}" + (f", claims {x['claims']}" if "claims" in x else "")
                             for x in r["table"])
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    return ""


def summary_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        if "error" in r:
            rows.append({"item": r["title"], "metric": "ERROR", "measured": r["error"].splitlines()[-1][:120],
                         "target": "", "result": "not run", "repeats": "", "threads": ""})
            continue
        rows.append({"item": r["title"], "metric": r.get("metric", ""), "measured": _value(r),
                     "target": r.get("target", ""), "result": _met(r.get("met"), r),
                     "repeats": r.get("repeats"), "threads": r.get("threads")})
    return rows


def results_md(meta: dict, results: list[dict]) -> str:
    m = meta["machine"]
    lines = [f"# Benchmark results — {meta['date']}", "",
             f"Machine: {m['nproc']} cores, {m['cpu_model']} ({m.get('isa', '?')}); torch {m['torch']}, python {m['python']}. "
             f"Load average {m['loadavg']} at start, {meta['loadavg_end']} at the end: **the machine was shared with "
             "other jobs** while this ran, so absolute times are noisy; every ratio below is measured within one run "
             "(interleaved where possible) and reports the median of repeats and the min.",
             f"Command: `{meta['command']}` ({'quick sizes' if meta['quick'] else 'full sizes'}), "
             f"total {meta['seconds'] / 60:.1f} min.", "", "## Summary", "",
             md_table(summary_rows(results)), "",
             *[f"- **{r['title']}**: {r['finding']}" for r in results if r.get("finding")], "",
             *(["### Targets over the last full runs (✓ met, ✗ missed)", "", history_table(), ""]
               if history_table() and not meta["quick"] else [])]
    for r in results:
        lines += [f"## {r['title']}", ""]
        mod = ITEMS[r["item"]][0]
        if mod:
            lines += [f"Code: `{mod.replace('.', '/')}.py` (method in its docstring). Took {r['seconds']:.0f} s.", ""]
        if "error" in r:
            lines += ["```", r["error"][-1500:], "```", ""]
            continue
        if r.get("met") is not None or r.get("metric"):
            lines += [f"**{r.get('metric', '')}**: {_value(r)} — target {r.get('target', '')}: {_met(r.get('met'), r)}", ""]
        for key in ("architectures", "table", "sharding_options"):
            if r.get(key):
                label = {"architectures": "Architectures (from bench/arch.py facts, built on the meta device)",
                         "table": "Measurements" if key == "table" and r["item"] != "real_scale"
                         else "Per-GPU memory and step FLOPs at the reference configuration",
                         "sharding_options": "Per-GPU GB with gradient checkpointing under other shardings "
                                             "(global batches as in params)"}[key]
                lines += [f"### {label}", "", md_table(r[key]), ""]
        if r["item"] == "step_floor":
            for d in r.get("details", []):
                lines += [f"<details><summary>passes: {d['model']} {d['stage']} (floor {d['floor_s'] * 1e3:.1f} ms, "
                          f"step {d['step_median_s'] * 1e3:.1f} ms)</summary>", "",
                          md_table(d["passes"], ["pass", "count", "median_ms", "min_ms", "total_ms"]), "</details>", ""]
        if r["item"] == "artifacts" and r.get("artifact"):
            lines += ["Artifact: " + ", ".join(f"{k} = {v}" for k, v in r["artifact"].items()), ""]
        if r["item"] == "toy2d_proofs":
            for k, txt in r.get("text", {}).items():
                lines += [f"### {k}", "", "```", txt[-4000:], "```", ""]
        for n in r.get("notes", []):
            lines.append(f"- {n}")
        lines.append("")
    return "\n".join(lines)


def history_entry(meta: dict, results: list[dict]) -> dict:
    return {"date": meta["date"], "loadavg": meta["machine"]["loadavg"],
            "values": {r["item"]: r.get("value") for r in results if r["item"] in TARGETED and "error" not in r},
            "met": {r["item"]: r.get("met") for r in results if r["item"] in TARGETED and "error" not in r}}


def history_table(last: int = 6) -> str:
    """The targeted items over the last full runs (how stable met/missed is on this machine)."""
    if not HISTORY.is_file():
        return ""
    rows = []
    for line in HISTORY.read_text().splitlines()[-last:]:
        h = json.loads(line)
        row = {"run": h["date"], "load avg (1 min)": h["loadavg"][0]}
        for it in TARGETED:
            v, m = h["values"].get(it), h["met"].get(it)
            row[ITEMS[it][1].split(". ", 1)[-1]] = "–" if v is None else f"{fmt(v)} {'✓' if m else '✗'}"
        rows.append(row)
    return md_table(rows)


def readme_section(meta: dict, results: list[dict]) -> str:
    m = meta["machine"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append({"item": r["title"], "measured": "not run (error)", "target": "", "result": ""})
            continue
        rows.append({"item": r["title"], "metric": r.get("metric", ""), "measured": _value(r),
                     "target": r.get("target", ""), "result": _met(r.get("met"), r), "details": headline(r)})
    return "\n".join([
        README_HEADING, "",
        "`make bench` (= `python -m bench.run`, < 20 min on 2 cores) measures how close each stage runs to its "
        "cost floor and what orchestration, artifacts and resume cost, and writes `bench/results.md` / "
        "`bench/results.json`; `python -m bench.run --quick --only artifacts,resume --out DIR` runs a subset at "
        "small sizes. Method per item: the docstring of `bench/<item>.py`.", "",
        f"Latest run: {meta['date']}, {m['nproc']} cores ({m['cpu_model']}, {m.get('isa', '?')}), load average {m['loadavg']} → "
        f"{meta['loadavg_end']} (shared machine: absolute times are noisy, ratios are measured within one run).", "",
        md_table(rows), "",
        *[f"- {r['title']}: {r['finding']}" for r in results if r.get("finding")], "",
        *(["Targets over the last full runs on this machine (✓ met, ✗ missed) — the borderline ones flip with "
           "the load of the shared cores:", "", history_table()] if history_table() else []),
        "Full tables (per-pass floors, scaling exponents, per-step flow overheads, per-GPU memory by role and "
        "sharding for FLUX.2-klein 4B/9B, SD3-M, SD3.5-M, FLUX.1-dev): [bench/results.md](bench/results.md).", ""])


def update_readme(section: str, path: Path = ROOT / "README.md") -> None:
    text = path.read_text()
    pat = re.compile(rf"^{re.escape(README_HEADING)}\s*$.*?(?=^## |\Z)", re.M | re.S)
    if pat.search(text):
        text = pat.sub(section.rstrip() + "\n\n", text, count=1)
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(ITEMS)}")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="directory for results.md / results.json")
    ap.add_argument("--workdir", default=None, help="scratch dir (default <out>/out/work)")
    ap.add_argument("--readme", choices=("auto", "yes", "no"), default="auto",
                    help="rewrite the README section (auto: only for a full run into bench/)")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: rebuild results.md (and the README section) from <out>/results.json")
    a = ap.parse_args(argv)
    if a.report_only:
        data = json.loads((Path(a.out) / "results.json").read_text())
        meta, results = data["meta"], list(data["results"].values())
        (Path(a.out) / "results.md").write_text(results_md(meta, results))
        full = not meta["quick"] and set(meta["items"]) == set(ITEMS) and Path(a.out).resolve() == DEFAULT_OUT.resolve()
        if a.readme == "yes" or (a.readme == "auto" and full):
            update_readme(readme_section(meta, results))
        return 0
    names = [n.strip() for n in a.only.split(",") if n.strip()] or list(ITEMS)
    bad = [n for n in names if n not in ITEMS]
    if bad:
        ap.error(f"unknown item(s) {bad}; choose from {', '.join(ITEMS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(a.workdir) if a.workdir else (ROOT / "bench" / "out" / "work" if out == DEFAULT_OUT
                                                 else out / "work")
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bench.common import machine

    meta = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(), "quick": a.quick,
            "items": names, "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])}
    t0 = time.time()
    results = []
    for n in names:
        print(f"[bench] {n} ...", file=sys.stderr, flush=True)
        r = run_item(n, a.quick, workdir)
        print(f"[bench] {n}: {r.get('error', '').splitlines()[-1] if 'error' in r else _value(r)} "
              f"({_met(r.get('met')) if 'error' not in r else 'error'}, {r['seconds']:.0f}s)", file=sys.stderr, flush=True)
        results.append(r)
    meta["seconds"] = time.time() - t0
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": {r["item"]: r for r in results}},
                                                 indent=1, default=str))
    (out / "results.md").write_text(results_md(meta, results))
    full = not a.quick and set(names) == set(ITEMS) and out.resolve() == DEFAULT_OUT.resolve()
    if full:
        with HISTORY.open("a") as fh:
            fh.write(json.dumps(history_entry(meta, results), default=str) + "\n")
        (out / "results.md").write_text(results_md(meta, results))  # now with this run in the history table
    if a.readme == "yes" or (a.readme == "auto" and full):
        update_readme(readme_section(meta, results))
    print(f"[bench] wrote {out / 'results.md'} ({meta['seconds'] / 60:.1f} min)", file=sys.stderr)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
