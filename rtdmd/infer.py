"""Inference: prompts → PNG images for any LoRA regime and sampler settings.

    python -m rtdmd.infer --config flux2_4b --prompt "a red bicycle" --out out/base          # no LoRA
    python -m rtdmd.infer --config flux2_4b --lora artifacts/run1/cold_start --prompt ... --out out/cs
    python -m rtdmd.infer --config flux2_4b --lora artifacts/run1/rl --prompt ... --out out/rl  # cold start + RL
    python -m rtdmd.infer --config flux2_4b --teacher --steps 50 --guidance 4 --prompt ... --out out/teacher
    torchrun --nproc_per_node 2 -m rtdmd.infer --config tiny_flux2 --prompt-file prompts.txt --out out/x

LoRA regimes (data_and_eval.md §4.3): no ``--lora`` runs the base generator; each ``--lora URI``
(repeatable; a local artifact dir or ``s3://`` URI) is merged into the base weights in order. An
RL artifact records its cold-start parent, so ``--lora <rl>`` alone merges cold start then RL
(checksums verified); ``--no-chain`` merges only the listed artifacts. Sampling: CPS over
``sampler.step_list`` (or ``--steps N`` evenly spaced / ``--step-list 1000,750,...``) with
``--eta`` (default ``sampler.eta``); ``--teacher`` samples the teacher with Euler and CFG
``--guidance`` (default ``sampler.teacher_guidance``). Sample ``i`` uses seed ``--seed + i``, so an
image does not depend on batch size or the number of processes (up to float rounding in batched
kernels: at most one grey level on rare pixels).

Writes ``{index:06d}.png`` (toy2d: ``points.csv``), ``grid.png`` and ``metadata.json`` (the spec's
schema: ``config``, ``num_images``, ``time_seconds_sum``; plus the prompts, sampler settings and
artifact checksums) into ``--out``. Exit status 2 on bad input (no prompts, bad artifact, ...).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

log = logging.getLogger("rtdmd.infer")


def make_variant(params, *, lora: Sequence[str] = (), teacher: bool = False, steps: int | None = None,
                 step_list: Sequence[float] | None = None, eta: float | None = None,
                 guidance: float | None = None, chain: bool = True, name: str = "infer"):
    from rtdmd.eval.variants import VariantError, parse_variant

    if teacher and lora:
        raise VariantError("--teacher samples the frozen teacher; it cannot be combined with --lora")
    kind = "teacher" if teacher else ("lora" if lora else "generator")
    opts = []
    if steps is not None:
        opts.append(f"steps={int(steps)}")
    if step_list:
        opts.append("step_list=" + "/".join(f"{float(s):g}" for s in step_list))
    if eta is not None:
        opts.append(f"eta={float(eta)!r}")
    if guidance is not None:
        opts.append(f"guidance={float(guidance)!r}")
    if kind == "lora":
        opts.insert(0, "placeholder")  # URIs are set below (they may contain commas)
        opts.append(f"chain={'true' if chain else 'false'}")
    spec = f"{name}={kind}" + (":" + ",".join(opts) if opts else "")
    v = parse_variant(spec, params)
    if kind == "lora":
        uris = [str(u).strip() for u in lora]
        if any(not u for u in uris):
            raise VariantError("--lora needs a non-empty artifact URI")
        v.lora_uris = uris
        v.spec = spec.replace("placeholder", "+".join(uris))
    return v


def run_inference(params, prompts: Sequence[str] | None, out_dir: str | Path, *, prompt_file: str | Path | None = None,
                  lora: Sequence[str] = (), teacher: bool = False, steps: int | None = None,
                  step_list: Sequence[float] | None = None, eta: float | None = None, guidance: float | None = None,
                  chain: bool = True, seed: int = 42, batch_size: int = 4, samples_per_prompt: int = 1,
                  device=None) -> dict:
    """Generate ``samples_per_prompt`` outputs per prompt and write them under ``out_dir`` (rank 0).
    Returns the metadata dict (on every rank)."""
    import torch

    from rtdmd.eval import report
    from rtdmd.eval.matrix import EvalInputError, _barrier, _broadcast, dist_env, expand, run_dataset
    from rtdmd.eval.prompts import inline_prompts
    from rtdmd.eval.variants import build_variant_net, describe_artifact, resolve_lora_stack

    if batch_size < 1 or samples_per_prompt < 1:
        raise EvalInputError(f"batch_size and samples_per_prompt must be >= 1, got {batch_size}, {samples_per_prompt}")
    src = inline_prompts(prompts, prompt_file)
    variant = make_variant(params, lora=lora, teacher=teacher, steps=steps, step_list=step_list, eta=eta,
                           guidance=guidance, chain=chain)
    stack = resolve_lora_stack(variant.lora_uris, params, follow_parents=variant.follow_parents) if lora else []
    toy = params.model.family == "toy2d"
    if toy:  # fail before building anything when a prompt names no class
        from rtdmd.backbones.toy2d import class_index_of

        for p in src.prompts:
            class_index_of(p)
    env = dist_env(device)
    try:
        from rtdmd.backbones import build_backbone

        backbone = build_backbone(params, device=env.device)
        net = build_variant_net(backbone, variant, stack)
        got = run_dataset(backbone, net, variant, src, {}, samples_per_prompt=samples_per_prompt, seed=int(seed),
                          env=env, batch_size=int(batch_size), keep="all", grid_size=0)
        meta = None
        if env.is_main:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            texts, _ = expand(src, samples_per_prompt)
            artifacts = [describe_artifact(a).to_dict() for a in stack]
            if toy:
                from rtdmd.eval.matrix import _class_points

                with open(out / "points.csv", "w", encoding="utf-8") as fh:
                    fh.write("index,prompt,x,y\n")
                    for row, i in enumerate(got.kept):
                        x, y = got.samples[row].tolist()
                        fh.write(f"{i},{texts[i]},{x:.6f},{y:.6f}\n")
                report.scatter_panel(_class_points(got.samples, texts, got.kept), variant.spec[:40]).save(out / "grid.png")
                files = ["points.csv"]
            else:
                files = []
                for row, i in enumerate(got.kept):
                    name = f"{i:06d}.png"
                    report.save_png(got.samples[row], out / name)
                    files.append(name)
                grid = report.image_grid([("", [got.samples[r] for r in range(min(16, len(got.kept)))])], label_width=0)
                if grid is not None:
                    grid.save(out / "grid.png")
            cfg = report.inference_config(params, variant, artifacts, batch_size=batch_size, world_size=env.world,
                                          samples_per_prompt=samples_per_prompt, seed=seed, eval_reward=False)
            cfg.update({"prompts": list(src.prompts), "prompt_file": str(prompt_file) if prompt_file else None})
            meta = {"config": cfg, "num_images": len(got.indices), "time_seconds_sum": got.time_seconds,
                    "variant": {"spec": variant.spec, "kind": variant.kind, "sampler": variant.sampler_settings(),
                                "artifacts": artifacts},
                    "samples": [{"index": i, "prompt": texts[i], "seed": int(seed) + i, "file": f}
                                for i, f in zip(got.kept, files if not toy else ["points.csv"] * len(got.kept))]}
            report.write_json(out / "metadata.json", meta)
        meta = _broadcast(meta, env)
        _barrier(env)
        del net
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
        return meta
    finally:
        if env.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m rtdmd.infer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="backbone params name (params/<name>.yaml) or a YAML path")
    ap.add_argument("--override", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted params overrides, repeatable")
    ap.add_argument("--lora", action="append", default=[], metavar="URI",
                    help="LoRA artifact to merge (repeatable, in order); its parent chain is merged first")
    ap.add_argument("--no-chain", action="store_true", help="merge only the listed artifacts, not their parents")
    ap.add_argument("--teacher", action="store_true", help="sample the teacher (Euler + CFG) instead of the generator")
    ap.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    ap.add_argument("--prompt-file", default=None, help="prompt file (.txt / .jsonl / .json), after --prompt")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--steps", type=int, default=None, help="number of sampling steps (evenly spaced)")
    ap.add_argument("--step-list", default=None, help="explicit comma-separated timesteps, e.g. 1000,750,500,250")
    ap.add_argument("--eta", type=float, default=None, help="CPS eta in [0, 1] (default: sampler.eta; teacher: 0)")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (default: 1 for the generator)")
    ap.add_argument("--seed", type=int, default=42, help="sample i uses seed + i")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--samples-per-prompt", type=int, default=1)
    ap.add_argument("--device", default=None)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from rtdmd.artifacts.fs import ArtifactError
    from rtdmd.backbones import BackboneError
    from rtdmd.config import ConfigError, load_params
    from rtdmd.config.bounds import check_cli_numbers
    from rtdmd.eval.matrix import EvalInputError
    from rtdmd.eval.prompts import EmptyPromptsError
    from rtdmd.eval.variants import VariantError

    overrides = [kv for group in args.override for kv in group]
    try:
        check_cli_numbers(steps=args.steps, eta=args.eta, guidance=args.guidance, seed=args.seed,  # bounds
                          batch_size=args.batch_size, samples_per_prompt=args.samples_per_prompt)
        params = load_params(args.config, overrides)
        if args.steps is not None and args.step_list:
            raise VariantError("give --steps or --step-list, not both")
        step_list = None
        if args.step_list:
            try:
                step_list = [float(s) for s in args.step_list.split(",") if s.strip()]
            except ValueError:
                raise VariantError(f"--step-list {args.step_list!r} must be comma-separated numbers") from None
        meta = run_inference(params, args.prompt, args.out, prompt_file=args.prompt_file, lora=args.lora,
                             teacher=args.teacher, steps=args.steps, step_list=step_list, eta=args.eta,
                             guidance=args.guidance, chain=not args.no_chain, seed=args.seed,
                             batch_size=args.batch_size, samples_per_prompt=args.samples_per_prompt,
                             device=args.device)
    except (ConfigError, EvalInputError, VariantError, EmptyPromptsError, ArtifactError, BackboneError,
            FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if meta is not None:
        import os

        if int(os.environ.get("RANK", "0")) == 0:
            print(f"wrote {meta['num_images']} samples to {args.out} "
                  f"({meta['variant']['spec']}, {meta['time_seconds_sum']:.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
