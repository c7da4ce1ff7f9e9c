"""The model subcommands of the ``rtdmd`` CLI: infer, eval, promote, rollback, history, ui.

Added to the ``rtdmd`` parser (:mod:`rtdmd.cli.main`) by :func:`add_subcommands`. Every command
takes the registry from ``--tracking-uri`` / ``$MLFLOW_TRACKING_URI`` (default: the sqlite store
under ``mlruns/``). Errors are single lines on stderr with exit status 2 (:mod:`rtdmd.cli.common`).
Modules that import torch (evaluation, sampling, backbones) are imported inside the commands that
need them, so ``promote`` / ``history`` / ``ui`` start without loading torch.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

from tqdm import tqdm

from rtdmd.cli.common import add_overrides, flat
from rtdmd.config import load_params
from rtdmd.registry.client import connect, model_name, resolve_tracking_uri
from rtdmd.registry.constants import CANDIDATE, CHAMPION
from rtdmd.registry.errors import GateFailure, RegistryError
from rtdmd.registry.load import load_registered, resolve_model
from rtdmd.registry.promote import format_history, history, promote, rollback
from rtdmd.registry.register import record_evaluation
from rtdmd.tracking import experiment_name

MODEL_HELP = ("model: models:/rtdmd-<backbone>@<alias>, models:/rtdmd-<backbone>/<version>, <backbone>@<alias>, "
              "<backbone>/<version>, or a LoRA artifact directory / s3:// URI")
RAW = argparse.RawDescriptionHelpFormatter


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")


def _overrides(p: argparse.ArgumentParser) -> None:
    add_overrides(p, "registry.held_out_tolerance=0.02")


# ----------------------------------------------------------------------------- infer
def cmd_infer(args) -> int:
    import torch  # lazy (torch), see the module docstring

    from rtdmd.eval import report
    from rtdmd.eval.matrix import class_points, to_uint8
    from rtdmd.eval.prompts import inline_prompts

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))
    src = inline_prompts(args.prompt, args.prompt_file)
    if args.batch_size < 1 or args.samples_per_prompt < 1:
        raise ValueError("--batch-size and --samples-per-prompt must be >= 1")
    if args.steps is not None and args.step_list:
        raise ValueError("give --steps or --step-list, not both")
    m = load_registered(args.model, tracking_uri=args.tracking_uri, device=args.device or "cpu",
                        overrides=flat(args.override), backbone=args.backbone)
    step_list = None
    if args.step_list:
        step_list = [float(s) for s in args.step_list.split(",") if s.strip()]
    elif args.steps is not None:
        if args.steps == m.sampler.nfe:
            step_list = list(m.sampler.step_list)
        else:
            from rtdmd.sampling import teacher_step_list  # lazy (torch)

            step_list = [float(s) for s in teacher_step_list(args.steps)]
    texts = [p for p in src.prompts for _ in range(args.samples_per_prompt)]
    toy = m.params.model.family == "toy2d"
    if toy:
        from rtdmd.backbones.toy2d import class_index_of  # lazy (torch)

        for t in src.prompts:
            class_index_of(t)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    outs, seconds = [], 0.0
    with tqdm(total=len(texts), desc=f"infer {m.resolved.label}", unit="sample", disable=args.quiet) as bar:
        for s in range(0, len(texts), args.batch_size):
            chunk = list(range(s, min(len(texts), s + args.batch_size)))
            t0 = time.perf_counter()
            x = m.generate([texts[i] for i in chunk], seed=[args.seed + i for i in chunk], step_list=step_list,
                           eta=args.eta, guidance=args.guidance)
            seconds += time.perf_counter() - t0
            outs.append(x.detach().float().cpu())
            bar.update(len(chunk))
    samples = torch.cat(outs)
    files = []
    if toy:
        with open(out / "points.csv", "w", encoding="utf-8") as fh:
            fh.write("index,prompt,x,y\n")
            for i, (px, py) in enumerate(samples.tolist()):
                fh.write(f"{i},{texts[i]},{px:.6f},{py:.6f}\n")
        report.scatter_panel(class_points(samples, texts, list(range(len(texts)))), m.resolved.label[:40]).save(out / "grid.png")
        files = ["points.csv"] * len(texts)
    else:
        imgs = to_uint8(samples)
        for i in range(len(texts)):
            name = f"{i:06d}.png"
            report.save_png(imgs[i], out / name)
            files.append(name)
        grid = report.image_grid([("", [imgs[i] for i in range(min(16, len(texts)))])], label_width=0)
        if grid is not None:
            grid.save(out / "grid.png")
    sampler = m.sampler.to_dict()
    if step_list is not None:
        sampler.update(step_list=step_list, nfe=len(step_list))
    if args.eta is not None:
        sampler["eta"] = args.eta
    if args.guidance is not None:
        sampler["guidance"] = args.guidance
    meta = {"model": {"ref": args.model, "name": m.resolved.name, "version": m.resolved.version,
                      "aliases": m.resolved.aliases, "stack": m.resolved.info.get("stack"),
                      "base_model": m.resolved.info.get("base_model")},
            "sampler": sampler, "num_images": len(texts), "time_seconds_sum": seconds, "prompts": list(src.prompts),
            "samples": [{"index": i, "prompt": texts[i], "seed": args.seed + i, "file": f} for i, f in enumerate(files)]}
    report.write_json(out / "metadata.json", meta)
    print(f"wrote {len(texts)} samples of {m.resolved.label} to {out}")
    return 0


# ----------------------------------------------------------------------------- eval
class _VariantProgress(logging.Handler):
    """Advances a tqdm bar on the evaluation matrix's per-variant log line."""

    def __init__(self, bar):
        super().__init__(logging.INFO)
        self.bar = bar

    def emit(self, record):
        if str(record.msg).startswith("variant "):
            self.bar.update(1)


def _split_named(text: str) -> tuple[str | None, str]:
    head, sep, rest = text.partition("=")
    if sep and not head.startswith(("models:", "s3:", "/", ".")) and "/" not in head and "@" not in head:
        return head, rest
    return None, text


def cmd_eval(args) -> int:
    from rtdmd.eval.matrix import run_matrix  # lazy (torch)

    if not args.models and not args.variant:
        raise ValueError("nothing to evaluate: give at least one model (or --variant)")
    overrides = flat(args.override)
    resolved, specs = [], []
    names: dict[str, str] = {}
    for item in args.models:
        name, ref = _split_named(item)
        r = resolve_model(ref, tracking_uri=args.tracking_uri, overrides=overrides, backbone=args.backbone)
        if name is None:
            if r.version:
                name = (f"{r.ref.alias}-v{r.version}" if r.ref.alias else f"v{r.version}")
            else:
                name = f"{r.info['stack'][-1].get('stage') or 'lora'}-{r.sampler.nfe}"
        if name in names:
            raise ValueError(f"two models are named '{name}'; name them with NAME=MODEL")
        names[name] = ref
        resolved.append((name, r))
        specs.append(r.variant_spec(name))
    if resolved:
        backbones = {r.params.name for _, r in resolved}
        if len(backbones) > 1:
            raise ValueError(f"the models belong to different backbones ({', '.join(sorted(backbones))}); evaluate them separately")
        params = resolved[0][1].params
    else:
        if not args.backbone:
            raise ValueError("--variant without a model needs --backbone")
        params = load_params(args.backbone, overrides)
    record_cold = None
    if args.record:
        regs = [(n, r) for n, r in resolved if r.version]
        if len(regs) != 1:
            raise ValueError("--record needs exactly one registered model (version or alias) among the models")
        n, r = regs[0]
        if len(r.stack_dirs) > 1 and r.info["stack"][0].get("stage") == "cold_start":
            record_cold = f"{n}-cold_start"
            steps = "/".join(f"{float(s):g}" for s in r.sampler.step_list)
            specs.append(f"{record_cold}=lora:{r.stack_dirs[0]},chain=false,step_list={steps},eta={r.sampler.eta!r},"
                         f"guidance={r.sampler.guidance!r}")
    if args.with_teacher:
        n = len(params.sampler.step_list)
        specs = [f"teacher-{params.eval.teacher_steps}=teacher", f"teacher-{n}=teacher:steps={n}", *specs]
    specs += list(args.variant)
    rewards = [r.strip() for r in args.rewards.split(",") if r.strip()] if args.rewards else None
    log = logging.getLogger("rtdmd.eval")
    prev = log.level
    log.setLevel(logging.INFO)
    with tqdm(total=len(specs), desc="evaluate", unit="variant", disable=args.quiet) as bar:
        handler = _VariantProgress(bar)
        log.addHandler(handler)
        try:
            summary = run_matrix(params, specs, args.out, rewards, reward_ckpt_dir=args.reward_ckpt,
                                 device=args.device, samples_per_prompt=args.samples_per_prompt,
                                 allow_unavailable=args.allow_unavailable, batch_size=args.batch_size,
                                 save_images=not args.no_images)
        finally:
            log.removeHandler(handler)
            log.setLevel(prev)
    if not args.quiet:
        print((Path(args.out) / "table.md").read_text())
    if args.record:
        n, r = [(n, r) for n, r in resolved if r.version][0]
        got = record_evaluation(f"models:/{r.name}/{r.version}", summary, tracking_uri=args.tracking_uri,
                                candidate_variant=n, cold_start_variant=record_cold)
        print(f"recorded the evaluation on {got['name']} v{got['version']}")
    return 0


# ----------------------------------------------------------------------------- promote / rollback / history
def cmd_promote(args) -> int:
    try:
        res = promote(args.backbone, version=args.version, run=args.run, force=args.force, reason=args.reason,
                      tracking_uri=args.tracking_uri, overrides=flat(args.override))
    except GateFailure as exc:
        print(exc.report.table(), file=sys.stderr)
        raise
    print(res.report.table())
    print(res.describe())
    return 0


def cmd_rollback(args) -> int:
    move = rollback(args.backbone, reason=args.reason, tracking_uri=args.tracking_uri, overrides=flat(args.override))
    print(f"rolled back: champion is v{move.version} again (was v{move.previous}); event {move.seq}")
    return 0


def cmd_history(args) -> int:
    params = load_params(args.backbone, flat(args.override))
    name = model_name(params)
    client = connect(args.tracking_uri)
    moves = history(name=name, client=client)
    if args.json:
        print(json.dumps([m.__dict__ for m in moves], indent=2))
        return 0
    aliases = client.get_registered_model(name).aliases or {}
    print(format_history(moves, name))
    print(f"current: champion -> {('v' + str(aliases[CHAMPION])) if CHAMPION in aliases else 'none'}, "
          f"candidate -> {('v' + str(aliases[CANDIDATE])) if CANDIDATE in aliases else 'none'}")
    return 0


# ----------------------------------------------------------------------------- ui
def compare_url(base: str, client, backbone: str | None = None) -> tuple[str, str]:
    """URL of the MLflow compare view of the latest flow run's evaluation runs, and a description."""
    exps = [e for e in client.search_experiments() if e.name.startswith("rtdmd")]
    if backbone:
        exps = [e for e in exps if e.name == experiment_name(backbone)]
    if not exps:
        return base + "/", "no rtdmd experiment in this store yet (run the flow first)"
    ids = [e.experiment_id for e in exps]
    parents = client.search_runs(ids, filter_string="tags.`rtdmd.kind` = 'flow'", max_results=20,
                                 order_by=["attributes.start_time DESC"])
    for parent in parents:
        logical = parent.data.tags.get("rtdmd.logical_run_id")
        evals = client.search_runs([parent.info.experiment_id], max_results=200,
                                   filter_string=f"tags.`rtdmd.kind` = 'eval' and tags.`rtdmd.logical_run_id` = '{logical}'",
                                   order_by=["attributes.start_time ASC"])
        if evals:
            runs = json.dumps([r.info.run_id for r in evals])
            url = (f"{base}/#/compare-runs?runs={quote(runs, safe='[],')}"
                   f"&experiments={quote(json.dumps([parent.info.experiment_id]), safe='[],')}")
            return url, (f"evaluation runs of flow run {parent.info.run_name} ({len(evals)} variants: "
                         + ", ".join(r.info.run_name for r in evals) + ")")
    return f"{base}/#/experiments/{ids[0]}", "no flow run with evaluation runs yet: showing the experiment"


def cmd_ui(args) -> int:
    uri = resolve_tracking_uri(args.tracking_uri)
    client = connect(uri)
    remote = uri.startswith(("http://", "https://"))
    base = uri.rstrip("/") if remote else f"http://{args.host}:{args.port}"
    url, what = compare_url(base, client, args.backbone)
    if remote or args.no_server:
        print(f"compare view ({what}):\n{url}", flush=True)
        return 0
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port), "--workers", "1"]
    if uri.startswith("sqlite:///"):  # proxied uploads from the UI land next to the flow's artifacts
        cmd += ["--artifacts-destination", str((Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve())]
    print(f"starting: {shlex.join(cmd)}", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def stop(*_):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.time() + args.start_timeout
        while True:
            if proc.poll() is not None:
                raise RegistryError(f"mlflow server exited with status {proc.returncode} (port {args.port} in use?)")
            try:
                opener.open(f"{base}/health", timeout=2).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise RegistryError(f"mlflow server did not answer on {base} within {args.start_timeout:g}s")
                time.sleep(0.5)
        print(f"MLflow UI: {base}/\ncompare view ({what}):\n{url}", flush=True)
        proc.wait()
    except KeyboardInterrupt:
        stop()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    return 0


# ----------------------------------------------------------------------------- parser
def add_subcommands(sub) -> None:
    """Add infer, eval, promote, rollback, history and ui to the ``rtdmd`` subparsers."""
    p = sub.add_parser("infer", help="prompts -> images with a registered version, alias or artifact", formatter_class=RAW,
                       description="Generate samples with a registered model (or a LoRA artifact) and its registered "
                                   "sampler settings.",
                       epilog="examples:\n"
                              "  rtdmd infer models:/rtdmd-tiny_flux2@champion --prompt 'a red bicycle' --out out/champ\n"
                              "  rtdmd infer toy2d/3 --prompt ring --prompt square --samples-per-prompt 64 --out out/v3\n"
                              "  rtdmd infer runs/artifacts/RtdmdFlow/12/rl/artifact --prompt-file p.txt --steps 8 --out out/x")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompt-file", default=None, help="prompt file (.txt / .jsonl / .json), after --prompt")
    p.add_argument("--out", required=True, help="output directory ({index:06d}.png, grid.png, metadata.json)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the registered NFE)")
    p.add_argument("--step-list", default=None, help="explicit timesteps, e.g. 1000,750,500,250")
    p.add_argument("--eta", type=float, default=None, help="CPS eta (default: registered)")
    p.add_argument("--guidance", type=float, default=None, help="guidance (default: registered; != 1 samples with CFG)")
    p.add_argument("--seed", type=int, default=42, help="sample i uses seed + i")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--backbone", default=None, help="params of an artifact whose manifest names none")
    p.add_argument("--device", default=None, help="default: cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _overrides(p)
    _common(p)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("eval", help="the reward evaluation matrix for registered versions / artifacts", formatter_class=RAW,
                       description="Evaluate models side by side (rtdmd.eval.run_matrix); each model is [NAME=]MODEL.",
                       epilog="examples:\n"
                              "  rtdmd eval toy2d@champion toy2d@candidate --with-teacher --out runs/eval/cmp\n"
                              "  rtdmd eval models:/rtdmd-toy2d/3 --record --out runs/eval/v3     # gate-ready evaluation\n"
                              "  rtdmd eval mine=runs/artifacts/RtdmdFlow/12/rl/artifact --variant t4=teacher:steps=4 --out x")
    p.add_argument("models", nargs="*", help=f"[NAME=]MODEL, {MODEL_HELP}")
    p.add_argument("--out", required=True, help="output directory (metadata.json, table.csv, table.md, grids)")
    p.add_argument("--variant", action="append", default=[], help="extra raw variant spec (rtdmd/eval/variants.py)")
    p.add_argument("--with-teacher", action="store_true", help="add the teacher at its full NFE and at the student's NFE")
    p.add_argument("--record", action="store_true",
                   help="record the result as the evaluation of the (single) registered model (with its cold start)")
    p.add_argument("--rewards", default=None, help="comma-separated rewards (default: eval.rewards)")
    p.add_argument("--reward-ckpt", default=None, help="reward checkpoint dir (default: $RTDMD_REWARD_CKPT_PATH)")
    p.add_argument("--samples-per-prompt", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--allow-unavailable", action="store_true", help="skip rewards whose scorer cannot be built")
    p.add_argument("--no-images", action="store_true", help="grids only")
    p.add_argument("--backbone", default=None, help="params for --variant-only runs or artifacts without one")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")
    _overrides(p)
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("promote", help="move 'champion' to a candidate if the gates pass", formatter_class=RAW,
                       description="Gate the candidate against the champion and its own cold-start model "
                                   "(params 'registry:' section) and move the champion alias; every move is recorded.",
                       epilog="examples:\n"
                              "  rtdmd promote --backbone toy2d                      # the version aliased 'candidate'\n"
                              "  rtdmd promote --backbone toy2d --version 3\n"
                              "  rtdmd promote --backbone toy2d --run 1732250000123456   # version registered by that flow run\n"
                              "  rtdmd promote --backbone toy2d --version 4 --force --reason 'hotfix: v3 OOMs on L4'")
    p.add_argument("--backbone", required=True, help="params name (registered model rtdmd-<backbone>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--version", default=None, help="version number (default: the 'candidate' alias)")
    g.add_argument("--run", default=None, help="MLflow run id or Metaflow run id that registered the version")
    p.add_argument("--force", action="store_true", help="promote even if gates fail (needs --reason)")
    p.add_argument("--reason", default=None, help="why (recorded; required with --force)")
    _overrides(p)
    _common(p)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="restore the previous champion", formatter_class=RAW,
                       epilog="example:\n  rtdmd rollback --backbone toy2d --reason 'v4 regressed in production'")
    p.add_argument("--backbone", required=True)
    p.add_argument("--reason", default=None, help="why (recorded)")
    _overrides(p)
    _common(p)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("history", help="print every champion move (time, user, versions, gates, reason)",
                       formatter_class=RAW, epilog="example:\n  rtdmd history --backbone toy2d")
    p.add_argument("--backbone", required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _overrides(p)
    _common(p)
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 and print the compare URL of the latest flow run",
                       formatter_class=RAW,
                       epilog="examples:\n  rtdmd ui                       # sqlite store under mlruns/, port 5000\n"
                              "  rtdmd ui --backbone toy2d --port 5050\n"
                              "  rtdmd ui --no-server            # only print the URL (e.g. for a running server)")
    p.add_argument("--backbone", default=None, help="only this backbone's experiment")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--no-server", action="store_true", help="print the compare URL without starting a server")
    p.add_argument("--start-timeout", type=float, default=180.0)
    _common(p)
    p.set_defaults(func=cmd_ui)
