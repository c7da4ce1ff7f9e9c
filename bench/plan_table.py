"""The "Will it fit?" tables: ``rtdmd plan`` for the ten reference configurations.

``python -m bench.plan_table [--backbones ...] [--stages ...] [--sharing on off] [--min-gpus]``

For every backbone × stage, at the params' reference GPU count (``compute.<stage>``) and per-GPU
batch, one simulation per sharing layout: ``distributed.share_base=true`` (one frozen base with an
adapter per role, the default) and ``false`` (separate copies, the reference's layout); the saving
is the difference of the two peaks. With ``--min-gpus`` the sharing-on configuration also gets the
smallest GPU count at which it fits (:mod:`rtdmd.plan.search`, memory-only simulations);
``--lower-bound-from KEY=VALUE`` starts that search at the answer of the same row run with that
override (e.g. ``rl.num_batches_per_epoch=1``: fewer sampling batches can only lower the peak, so
no smaller count can fit); ``--chunk-limit N`` simulates the search's probes with RL's chunked
loops cut to their first N chunks (:func:`rtdmd.plan.simulate.limited_chunks`: same peak, a
fraction of the time below the reference GPU count). FLOPs are
counted once per configuration (the sharing-on run). Each finished row is written to the JSON at
once (``--resume`` skips rows already there), then the markdown table is rebuilt from the JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BACKBONES = ("flux2_4b", "flux2_9b", "sd3m", "sd35m", "flux1_dev")
STAGES = ("cold_start", "rl")
HERE = Path(__file__).resolve().parent
PHASE_COLS = ("load", "rollout", "fake_update", "generator_update", "bp")
NB1 = "rl.num_batches_per_epoch=1"  # one sampling batch per epoch: its smallest count bounds the reference's


def run_row(backbone: str, stage: str, share: bool, *, gpu_memory: float, headroom: float, min_gpus: bool,
            flops: bool, extra: list[str], spec=None, reward_specs=None, row: dict | None = None,
            at_least: int | None = None, chunk_limit: int | None = None) -> dict:
    """One configuration: :func:`rtdmd.plan.cli.plan` at the reference GPU count (or, given a
    finished ``row``, only its smallest-GPU-count search)."""
    from unittest import mock

    from rtdmd.config import load_params
    from rtdmd.plan import simulate as S
    from rtdmd.plan.cli import min_gpus_search, plan
    from rtdmd.plan.simulate import stage_overrides

    params = load_params(backbone, stage_overrides(stage) + [f"distributed.share_base={str(share).lower()}",
                                                             *extra])
    comp = getattr(params.compute, stage)
    real = S.simulate

    def simulate(p, st, **kw):  # the validation components when given (tests), else the published ones
        return real(p, st, spec=spec, reward_specs=reward_specs, **kw)

    t0 = time.time()
    with mock.patch.object(S, "simulate", simulate):
        if row is not None:  # a finished row: only the smallest-count search is missing
            r = dict(row)
            r["min_gpus"] = min_gpus_search(params, stage, row["nodes"], row["gpus_per_node"], row["peak_bytes"],
                                            row["limit_bytes"], at_least=at_least, chunk_limit=chunk_limit)
            r["search_seconds"] = time.time() - t0
            return r
        r = plan(params, stage, int(comp.nodes), int(comp.gpus_per_node), gpu_memory=gpu_memory,
                 headroom=headroom, flops=flops, min_gpus=min_gpus, at_least=at_least, chunk_limit=chunk_limit)
    r["share_base"] = share
    r["overrides"] = list(extra)
    r["wall_seconds"] = time.time() - t0
    return r


def _gib(x) -> str:
    return "" if x is None else f"{x / 2 ** 30:.1f}"


def _stage(r: dict) -> str:
    """The stage, with any params override of the row (a row with overrides is not the reference's)."""
    ov = r.get("overrides") or []
    return r["stage"] + (f" [{', '.join(ov)}]" if ov else "")


def markdown(rows: list[dict]) -> str:
    """The fit table (sharing on), the sharing-off table with the saving, and the smallest GPU counts."""
    by = {(r["backbone"], _stage(r), r["share_base"]): r for r in rows}
    keys = sorted({(r["backbone"], _stage(r)) for r in rows},
                  key=lambda k: (k[1], BACKBONES.index(k[0]) if k[0] in BACKBONES else 99, k[0]))
    head = "| backbone | stage | GPUs | per-GPU batch | " + " | ".join(PHASE_COLS) + " | peak | fits |"
    out = []
    for share, title in ((True, "shared frozen base (default)"), (False, "separate copies (reference layout)")):
        out += [f"**{title}**, GiB per GPU:", "", head + (" saving vs separate |" if share else ""),
                "|" + "---|" * (len(PHASE_COLS) + 6 + (1 if share else 0))]
        for k in keys:
            r = by.get((*k, share))
            if r is None:
                continue
            if "error" in r:
                out.append(f"| {k[0]} | {k[1]} | | | {r['error']} |")
                continue
            ph = [_gib(r["peak_by_phase"].get(p)) for p in PHASE_COLS]
            fits = f"{'yes' if r['fits'] else 'NO'} (limit {r['limit_bytes'] / 2 ** 30:.0f})"
            line = (f"| {k[0]} | {k[1]} | {r['nodes']}×{r['gpus_per_node']} {r['strategy']} | {r['per_gpu_batch']} | "
                    + " | ".join(ph) + f" | {_gib(r['peak_bytes'])} | {fits} |")
            if share:
                off = by.get((*k, False))
                saving = "" if off is None or "error" in off else f"{(off['peak_bytes'] - r['peak_bytes']) / 2 ** 30:.1f}"
                line += f" {saving} |"
            out.append(line)
        out.append("")
    out += ["**Smallest GPU count that fits** (shared base; binary search by simulation):", "",
            "| backbone | stage | reference GPUs | smallest | simulated probes (GPUs: peak GiB) | PFLOP/step/GPU | "
            "s/step at 40 % H100 |", "|---|---|---|---|---|---|---|"]
    for k in keys:
        r = by.get((*k, True))
        if r is None or "error" in r:
            continue
        mg = r.get("min_gpus")
        low = by.get((k[0], _stage({"stage": r["stage"], "overrides": [NB1]}), True)) if not r.get("overrides") else None
        low_w = ((low or {}).get("min_gpus") or {}).get("world")
        smallest = ("not searched" + (f" (≥ {low_w}: the answer at {NB1})" if low_w else "")) if mg is None else (
            f"none ≤ {max(mg['candidates'])}" if mg["world"] is None else str(mg["world"]))
        probes = "" if mg is None else ", ".join(f"{p['world']}: {_gib(p['peak_bytes'])}" for p in mg["probes"])
        if mg is not None and mg.get("note"):
            smallest += f" ({mg['note']})"
        if mg is not None and mg.get("at_least"):
            probes += f" (fewer than {mg['at_least']} ruled out by the row with fewer sampling batches)"
        if mg is not None and mg.get("chunk_limit"):
            probes += f" (probes with RL's chunked loops cut to their first {mg['chunk_limit']} chunks)"
        pf = f"{r['flops_per_step_per_gpu'] / 1e15:.2f}" if r.get("flops_counted", True) else ""
        st = f"{r['step_seconds_at_mfu']:.1f}" if r.get("flops_counted", True) else ""
        out.append(f"| {k[0]} | {k[1]} | {r['world']} | {smallest} | {probes} | {pf} | {st} |")
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.plan_table", description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--sharing", nargs="+", default=["on", "off"], choices=("on", "off"))
    ap.add_argument("--min-gpus", action="store_true", help="search the smallest GPU count (sharing on)")
    ap.add_argument("--lower-bound-from", default=None, metavar="KEY=VALUE",
                    help="start --min-gpus at the answer of the same row run with this override")
    ap.add_argument("--chunk-limit", type=int, default=None, metavar="N",
                    help="the --min-gpus probes: RL's chunked loops run their first N chunks (same peak, less time)")
    ap.add_argument("--gpu-memory", type=float, default=80.0)
    ap.add_argument("--headroom", type=float, default=0.10)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override for every row")
    ap.add_argument("--json", type=Path, default=HERE / "plan_table.json")
    ap.add_argument("--md", type=Path, default=HERE / "plan_table.md")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --json, run the others")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --json")
    return ap


def main(argv=None, *, spec=None, reward_specs=None) -> int:
    args = build_parser().parse_args(argv)
    if args.json.exists() and not (args.resume or args.force):
        print(f"plan_table: error: {args.json} exists; pass --resume to continue it or --force to overwrite",
              file=sys.stderr)
        return 2
    rows = json.loads(args.json.read_text())["rows"] if args.resume and args.json.exists() else []
    done = {(r["backbone"], _stage(r), r["share_base"]): i for i, r in enumerate(rows)}
    by_key = {k: rows[i] for k, i in done.items()}
    for stage in args.stages:
        for backbone in args.backbones:
            for share in (s == "on" for s in args.sharing):
                i = done.get((backbone, _stage({"stage": stage, "overrides": args.set}), share))
                old = None if i is None else rows[i]
                if old is not None and not (args.min_gpus and share and "error" not in old
                                            and "min_gpus" not in old):
                    continue
                if old is not None:
                    rows.pop(i)
                    done = {(r["backbone"], _stage(r), r["share_base"]): j for j, r in enumerate(rows)}
                bound = None
                if args.lower_bound_from and args.min_gpus and share:
                    low = by_key.get((backbone, _stage({"stage": stage, "overrides": [args.lower_bound_from]}), share))
                    bound = ((low or {}).get("min_gpus") or {}).get("world")
                try:
                    r = run_row(backbone, stage, share, gpu_memory=args.gpu_memory, headroom=args.headroom,
                                min_gpus=args.min_gpus and share, flops=share, extra=list(args.set), spec=spec,
                                reward_specs=reward_specs, row=old, at_least=bound,
                                chunk_limit=args.chunk_limit if stage == "rl" and args.min_gpus and share else None)
                except Exception as e:  # a configuration the code refuses is a row, not the end of the table
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    r = dict(old, min_gpus_error=msg) if old is not None else {
                        "backbone": backbone, "stage": stage, "share_base": share, "overrides": list(args.set),
                        "error": msg}
                rows.append(r)
                args.json.write_text(json.dumps({"rows": rows}, indent=1, default=str))
                args.md.write_text(markdown(rows))
                print(f"{backbone} {stage} share_base={share}: "
                      f"{r.get('error') or _gib(r['peak_bytes']) + ' GiB peak'}", flush=True)
    args.md.write_text(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
