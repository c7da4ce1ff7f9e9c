"""Inference: prompts → samples for any LoRA regime and sampler settings, written as files.

:func:`run_inference` is the library call behind ``python -m rtdmd.infer`` (command line and the
LoRA regimes: :mod:`rtdmd.cli.infer`). Sample ``i`` uses seed ``seed + i``, so an output does not
depend on batch size or the number of processes (up to float rounding in batched kernels). Writes
``{index:06d}.png`` (toy2d: ``points.csv``), ``grid.png`` and ``metadata.json`` (``config``,
``num_images``, ``time_seconds_sum``, the prompts, sampler settings and artifact checksums).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from rtdmd.backbones import build_backbone
from rtdmd.backbones.toy2d import class_index_of
from rtdmd.eval import report
from rtdmd.eval.matrix import EvalInputError, _barrier, _broadcast, dist_env, run_dataset
from rtdmd.eval.prompts import class_points, expand, inline_prompts
from rtdmd.eval.variants import VariantError, build_variant_net, describe_artifact, parse_variant, resolve_lora_stack

log = logging.getLogger("rtdmd.infer")


def make_variant(params, *, lora: Sequence[str] = (), teacher: bool = False, steps: int | None = None,
                 step_list: Sequence[float] | None = None, eta: float | None = None,
                 guidance: float | None = None, chain: bool = True, name: str = "infer"):
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
    if batch_size < 1 or samples_per_prompt < 1:
        raise EvalInputError(f"batch_size and samples_per_prompt must be >= 1, got {batch_size}, {samples_per_prompt}")
    src = inline_prompts(prompts, prompt_file)
    variant = make_variant(params, lora=lora, teacher=teacher, steps=steps, step_list=step_list, eta=eta,
                           guidance=guidance, chain=chain)
    stack = resolve_lora_stack(variant.lora_uris, params, follow_parents=variant.follow_parents) if lora else []
    toy = params.model.family == "toy2d"
    if toy:  # fail before building anything when a prompt names no class
        for p in src.prompts:
            class_index_of(p)
    env = dist_env(device)
    try:
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
                with open(out / "points.csv", "w", encoding="utf-8") as fh:
                    fh.write("index,prompt,x,y\n")
                    for row, i in enumerate(got.kept):
                        x, y = got.samples[row].tolist()
                        fh.write(f"{i},{texts[i]},{x:.6f},{y:.6f}\n")
                report.scatter_panel(class_points(got.samples, texts, got.kept), variant.spec[:40]).save(out / "grid.png")
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
            dist.destroy_process_group()
