"""Golden traces: the refactoring guard for the training stages.

For each stage (``cold_start``, ``rl``) on ``toy2d`` and ``tiny_flux2``, 20 steps (RL: epochs)
with a fixed seed, one thread and ``torch.use_deterministic_algorithms``, recorded in-process:

* every logged metric of every step (``log_interval=1``; wall-clock keys dropped), and
* a sha256 over the final LoRA tensors of every trainable role and of the EMA shadow (names,
  dtypes, shapes and bytes, in sorted key order), and of the published artifact's tensors.

``tests/golden/test_golden_traces.py`` re-runs the same configurations and requires equality
bit for bit on a CPU kind with traces of its own (below). A change that is not meant to change the numbers (a refactor) must keep them; a
change that is (a bug fix) regenerates them in its own commit, saying why::

    python -m tests.golden.traces --write           # all four
    python -m tests.golden.traces --write --only toy2d-rl

Bit-identity holds on one CPU kind only: the CPU kernels torch picks differ between vendors and
instruction sets (MKL/oneDNN dispatch), and the first differing rounding grows over 20 steps. The
traces are therefore kept per kind, ``traces/<vendor>-<capability>/<case>.json``
(:func:`cpu_kind`, e.g. ``genuineintel-avx512``; ``--write`` records the current kind's). On a kind
with no traces of its own the test compares with every recorded kind within :data:`CROSS_KIND_RTOL`
(relative, with :data:`CROSS_KIND_ATOL` for values near 0) instead: a change of the maths still shows,
a different rounding does not. Record a new kind's traces only from a tree whose other kinds pass.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TRACES = HERE / "traces"
# cross-kind tolerance, from the AMD and the Intel AVX-512 traces of the same tree: their largest
# relative difference is 3.7e-4 (tiny_flux2 RL, adv/abs_mean at epoch 15; toy2d RL 7.2e-5, the cold
# starts < 6e-6) among values that differ by more than 1e-6; values near 0 (adv/mean ~1e-8) differ
# by < 4e-8 absolute. Tolerance: 10x the relative, and 1e-6 absolute
CROSS_KIND_RTOL = 4e-3
CROSS_KIND_ATOL = 1e-6
ROOT = HERE.parents[1]
STEPS = 20
CASES = ("toy2d-cold_start", "toy2d-rl", "tiny_flux2-cold_start", "tiny_flux2-rl")
TOY_PROMPTS = [f"{v} {c}" for c in ("ring", "square", "triangle") for v in ("a", "one more", "yet another")]
TEXT_PROMPTS = ["a red cat on a table", "a blue car at night", "a small tree in the snow", "a golden clock"]


class RecordingLogger:
    """Keeps every logged metric row in memory (the trainer's logger interface)."""

    def __init__(self):
        self.rows: list[dict] = []

    def log_metrics(self, step, metrics):
        row = {k: float(v) for k, v in metrics.items() if not k.startswith("time/")}
        if row:
            self.rows.append({"step": int(step), **row})

    def log_params(self, params):
        pass

    def close(self):
        pass


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _overrides(backbone: str, stage: str, work: Path) -> list[str]:
    common = ["distributed.strategy=none"]
    if backbone == "toy2d":
        prompts = work / "prompts"
        prompts.mkdir(parents=True, exist_ok=True)
        (prompts / "train.txt").write_text("\n".join(TOY_PROMPTS) + "\n")
        if stage == "cold_start":
            return common + [f"cold_start.total_steps={STEPS}", "cold_start.log_interval=1",
                             "cold_start.eval_interval=0", "cold_start.checkpoint.save_interval=10",
                             f"cold_start.prompts={prompts}"]
        return common + [f"rl.prompts={prompts}", "rl.num_images_per_prompt=8", "rl.global_sample_batch_size=24",
                         "rl.num_batches_per_epoch=2", f"rl.epochs={STEPS}", "rl.eval_interval=0",
                         "rl.log_interval=1", "rl.checkpoint.save_interval=10", "rl.ema_interval=3"]
    ptxt = work / "prompts" / "train.txt"
    ptxt.parent.mkdir(parents=True, exist_ok=True)
    ptxt.write_text("\n".join(TEXT_PROMPTS) + "\n")
    tiny = ["model.resolution=32", "distributed.mixed_precision=fp32", "model.text_encoder_out_layers=[1,2,3]"]
    if stage == "cold_start":
        return common + tiny + [f"cold_start.prompts={ptxt}", "cold_start.global_batch_size=2",
                                f"cold_start.total_steps={STEPS}", "cold_start.log_interval=1",
                                "cold_start.eval_interval=0", "cold_start.checkpoint.save_interval=10"]
    # stage 2 with a shared base keeps the --init chain unmerged (rtdmd.train.shared_base): equal to
    # the merged separate copies up to rounding only, so the bit-exact trace pins the separate layout
    return common + tiny + ["distributed.share_base=false", f"rl.prompts={ptxt}", "rl.num_images_per_prompt=2", "rl.global_sample_batch_size=4",
                            "rl.num_batches_per_epoch=2", f"rl.epochs={STEPS}", "rl.eval_interval=0",
                            "rl.log_interval=1", "rl.fake_score_batch_size=4", "rl.checkpoint.save_interval=10",
                            "rl.reward_weights={clipscore: 1.0, pickscore: 1.0}", "rl.bp.grad_scale=0.01",
                            "eval.num_prompts=2", "eval.batch_size=2"]


def _init_artifact(params, out: Path, seed: int = 0, scale: float = 0.02) -> str:
    """A fixed random LoRA artifact standing in for a cold-start output (RL's ``--init``)."""
    from rtdmd.backbones import build_backbone
    from rtdmd.lora import inject_lora, lora_parameters, lora_state_dict
    from rtdmd.lora.artifact import Adapter, publish_lora_artifact

    lc = params.lora
    bb = build_backbone(params)
    g = torch.Generator().manual_seed(seed)
    adapters = {}
    for role in ("generator", "fake_score"):
        net = bb.load_transformer(role)
        inject_lora(net, list(lc.targets), lc.rank, lc.alpha)
        with torch.no_grad():
            for p in lora_parameters(net).values():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        adapters[role] = Adapter(lora_state_dict(net), lc.rank, lc.alpha, list(lc.targets))
    publish_lora_artifact(str(out), adapters, {"stage": "cold_start", "backbone": params.name, "parent": None})
    return str(out)


def run_case(case: str, work: Path) -> dict:
    """Run one configuration in this process and return its trace."""
    from rtdmd.config import load_params
    from rtdmd.lora.artifact import load_lora_artifact

    backbone, stage = case.split("-", 1)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    over = _overrides(backbone, stage, work)
    params = load_params(backbone, over)
    init = None
    if stage == "rl":
        init = _init_artifact(params, work / "init", scale=0.02 if backbone == "toy2d" else 0.01)
    if backbone != "toy2d":
        from rtdmd.rewards import clear_scorer_cache
        from rtdmd.rewards.tiny import build_tiny_reward_checkpoints

        ck = build_tiny_reward_checkpoints(work / "reward_ckpts", names=["clipscore", "pickscore"])
        os.environ["RTDMD_REWARD_CKPT_PATH"] = str(ck)
        clear_scorer_cache()
    trainer = _trainer_class(stage)(params, _run_options(work / "out", init), logger=(log := RecordingLogger()))
    trainer.run()
    roles = {role: tensor_digest(trainer.roles.lora_state(role)) for role in trainer.trainable}
    art = load_lora_artifact(str(work / "out" / "artifact"))
    published = {role: tensor_digest(a.state) for role, a in sorted(art.adapters.items())}
    return {"case": case, "steps": STEPS, "metrics": log.rows, "lora_sha256": roles,
            "ema_sha256": tensor_digest({k: v for k, v in trainer.ema.shadow.items()}),
            "artifact_sha256": published}


def _trainer_class(stage: str):
    if stage == "cold_start":
        from rtdmd.train.cold_start import ColdStartTrainer

        return ColdStartTrainer
    from rtdmd.train.rl import RLTrainer

    return RLTrainer


def _run_options(out: Path, init):
    from rtdmd.train.base import RunOptions

    return RunOptions(out=str(out), init=init)


def cpu_kind() -> str:
    """``<vendor>-<capability>`` of this machine, e.g. ``genuineintel-avx512`` (the golden traces' key)."""
    vendor = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    except OSError:
        import platform

        vendor = platform.processor() or platform.machine() or vendor
    return f"{vendor}-{torch.backends.cpu.get_cpu_capability()}".lower().replace(" ", "_")


def recorded_kinds() -> list[str]:
    return sorted(p.name for p in TRACES.iterdir() if p.is_dir()) if TRACES.is_dir() else []


def path_for(case: str, kind: str | None = None) -> Path:
    return TRACES / (kind or cpu_kind()) / f"{case}.json"


def compare_close(expected: dict, got: dict, rtol: float = CROSS_KIND_RTOL, atol: float = CROSS_KIND_ATOL) -> list[str]:
    """Metric differences beyond ``|a − b| ≤ atol + rtol·|a|`` (tensor digests are not compared:
    another CPU kind's rounding changes every bit)."""
    diffs = []
    em, gm = expected["metrics"], got["metrics"]
    if len(em) != len(gm):
        diffs.append(f"number of metric rows {len(em)} != {len(gm)}")
    for a, b in zip(em, gm):
        if set(a) != set(b):
            diffs.append(f"step {a.get('step')}: metric keys differ: {sorted(set(a) ^ set(b))}")
        for k in sorted(set(a) & set(b)):
            va, vb = a[k], b[k]
            if isinstance(va, float) and isinstance(vb, float) and math.isnan(va) and math.isnan(vb):
                continue
            if not abs(va - vb) <= atol + rtol * abs(va):
                diffs.append(f"step {a.get('step')} {k}: {va!r} vs {vb!r} (beyond rtol {rtol}, atol {atol})")
    return diffs


def check(case: str, got: dict) -> tuple[str, list[str]]:
    """``(how, differences)`` of a fresh trace against the goldens: bit for bit against this CPU
    kind's traces when it has them, else within the cross-kind tolerance against every recorded
    kind (differences prefixed with that kind). Empty differences = reproduced."""
    kind = cpu_kind()
    if path_for(case, kind).exists():
        return f"bit-identical to {kind}", compare(json.loads(path_for(case, kind).read_text()), got)
    kinds = recorded_kinds()
    if not kinds:
        return "no golden traces recorded", ["no golden traces recorded"]
    diffs = [f"[{other}] {d}" for other in kinds
             for d in compare_close(json.loads(path_for(case, other).read_text()), got)]
    return f"{kind} has no traces: within rtol {CROSS_KIND_RTOL} of {', '.join(kinds)}", diffs


def compare(expected: dict, got: dict) -> list[str]:
    """Differences between two traces, as readable lines (empty = bit-identical)."""
    diffs = []
    for key in ("lora_sha256", "ema_sha256", "artifact_sha256"):
        if expected[key] != got[key]:
            diffs.append(f"{key}: {expected[key]} != {got[key]}")
    em, gm = expected["metrics"], got["metrics"]
    if len(em) != len(gm):
        diffs.append(f"number of metric rows {len(em)} != {len(gm)}")
    for a, b in zip(em, gm):
        for k in sorted(set(a) | set(b)):
            va, vb = a.get(k), b.get(k)
            same = va == vb or (isinstance(va, float) and isinstance(vb, float) and math.isnan(va) and math.isnan(vb))
            if not same:
                diffs.append(f"step {a.get('step')} {k}: {va!r} != {vb!r}")
    return diffs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.golden.traces", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="record the traces under tests/golden/")
    ap.add_argument("--only", action="append", choices=CASES)
    args = ap.parse_args(argv)
    bad = 0
    for case in args.only or CASES:
        with tempfile.TemporaryDirectory() as d:
            got = run_case(case, Path(d))
        if args.write:
            path_for(case).parent.mkdir(parents=True, exist_ok=True)
            path_for(case).write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
            print(f"wrote {path_for(case)}")
        else:
            how, diffs = check(case, got)
            bad += bool(diffs)
            print(f"{case}: {'reproduced' if not diffs else 'DIFFERENT'} ({how})", *diffs[:10], sep="\n  ")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
