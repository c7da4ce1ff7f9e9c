"""Item 1 — step cost vs its floor, cold start (AC-DMD) and RL (RTDMD), tiny_flux2 and toy2d.

*Step*: the trainer's own iteration as ``Trainer.run`` runs it, ``train_step()`` +
``roles.reshard()`` + ``after_step()`` (EMA) (:func:`bench.setups.loop_step`) — for the cold
start one TTUR cycle of ``fake_update_ratio`` iterations (so it holds exactly one generator turn
besides the critic turns), for RL one epoch (``RLEngine.run_epoch``: sampling, rewards,
fake-score update, advantages, generator update).

*Floor*: the passes the step cannot avoid, recorded from a real step and replayed in isolation
on the same modules with the same inputs (:mod:`bench.passes`): text encoder, generator rollout
forwards, teacher forwards (CFG batch), fake-score forward(+backward), VAE decode and reward
forward(+backward), optimizer steps (clip + AdamW). ``floor = Σ count · median``.

Steps and replays are interleaved round by round (step, then one replay of every pass), so a
change of machine load hits both. ``ratio = median(step) / floor``; target ≤ 1.15.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

TARGET = 1.15


def _instrument(rec, tr, rl: bool) -> None:
    roles = tr.roles
    rec.watch_module("teacher", roles.teacher)
    rec.watch_module("generator", roles.raw["generator"])
    rec.watch_module("fake_score", roles.raw["fake_score"])
    rec.watch_method(tr.backbone, "encode_prompts", "text encode", grad_arg=None)
    rec.watch_method(tr.backbone, "decode", "vae decode", grad_arg=0)
    if rl:
        eng = tr.engine
        eng.reward_fn = rec.reward_proxy(eng.reward_fn, "reward")
        if eng.bp_reward_fn is not None:
            eng.bp_reward_fn = rec.reward_proxy(eng.bp_reward_fn, "reward")
        cfgs = {"generator": tr.params.rl.generator, "fake_score": tr.params.rl.fake_score}
    else:
        cfgs = {"generator": tr.cfg.generator, "fake_score": tr.cfg.fake_score}
    for role, opt in tr.optimizers.items():
        rec.watch_optimizer(role, opt, list(tr.roles.lora_params(role).values()), cfgs[role].max_grad_norm)


def measure(tr, *, rl: bool, rounds: int, warmup: int = 1) -> dict:
    from bench.common import stats, timed
    from bench.passes import PassRecorder

    cycle = 1 if rl else max(1, int(tr.cfg.fake_update_ratio))

    from bench.setups import loop_step

    def step():
        for _ in range(cycle):
            loop_step(tr)

    rec = PassRecorder()
    _instrument(rec, tr, rl)
    for _ in range(warmup):
        step()
    with rec.recording():
        step()
    counts = rec.counts()
    times, per_round = [], []
    for _ in range(rounds):
        t = timed(step)
        f = rec.replay_once(counts=counts)
        times.append(t)
        per_round.append(t / f)
    rec.close()
    floor, rows = rec.floor(counts)
    floor_min, _ = rec.floor(counts, use_min=True)
    st = stats(times)
    return {"step_median_s": st["median"], "step_min_s": st["min"], "floor_s": floor, "floor_min_s": floor_min,
            "ratio": st["median"] / floor, "ratio_min": st["min"] / floor_min,
            "ratio_per_round_median": stats(per_round)["median"],
            "iterations_per_step": cycle, "rounds": rounds, "passes": rows}


def cases(quick: bool, workdir: Path) -> list[tuple[str, str, str, list[str], int]]:
    """(label, stage, params name, overrides, rounds)."""
    out = [("toy2d", "cold_start", "toy2d", [], 3 if quick else 15),
           ("toy2d", "rl", "toy2d", [], 3 if quick else 15),
           ("tiny_flux2", "cold_start", "tiny_flux2", [], 3 if quick else 9),
           ("tiny_flux2", "rl", "tiny_flux2", [], 3 if quick else 9)]
    if not quick:
        from bench.compute_eff import LARGE, large_overrides

        ov = large_overrides(workdir)
        out += [(f"tiny_flux2 {LARGE['label']}", "cold_start", "tiny_flux2", ov, 4),
                (f"tiny_flux2 {LARGE['label']}", "rl", "tiny_flux2", ov + LARGE["rl_overrides"], 4)]
    return out


def run_case(label: str, stage: str, name: str, overrides: list[str], rounds: int, workdir: Path) -> dict:
    from bench import setups

    out = Path(tempfile.mkdtemp(prefix="bench-step-", dir=workdir))
    if stage == "cold_start":
        tr = setups.cold_start_trainer(name, out, overrides)
    else:
        tr = setups.rl_trainer(name, out, workdir, overrides)
    res = measure(tr, rl=stage == "rl", rounds=rounds)
    res.update({"model": label, "stage": stage})
    return res


def run(quick: bool, workdir: Path, threads: int = 1) -> dict:
    from bench.common import set_threads

    set_threads(threads)
    rows, details = [], []
    for label, stage, name, ov, rounds in cases(quick, workdir):
        r = run_case(label, stage, name, ov, rounds, workdir)
        details.append(r)
        rows.append({"model": label, "stage": stage, "step median s": r["step_median_s"], "step min s": r["step_min_s"],
                     "floor s": r["floor_s"], "ratio": r["ratio"], "ratio min/min": r["ratio_min"],
                     "ratio per round (median)": r["ratio_per_round_median"],
                     "rounds": rounds,
                     "met (≤1.15)": r["ratio"] is not None and r["ratio"] <= TARGET})
    per_iter = "; ".join(f"{d['model']} {d['stage']} {1e3 * (d['step_median_s'] - d['floor_s']) / d['iterations_per_step']:.1f} ms "
                         f"over a {1e3 * d['floor_s'] / d['iterations_per_step']:.1f} ms floor"
                         for d in details)
    default = [r for r in rows if r["model"] in ("tiny_flux2", "toy2d")]
    worst = max(r["ratio"] for r in default)
    return {
        "title": "Step cost vs floor", "metric": "max ratio median(step)/floor over toy2d + tiny_flux2, both stages",
        "value": worst, "target": f"≤ {TARGET} for both stages", "met": worst <= TARGET, "threads": threads,
        "repeats": max(r["rounds"] for r in rows), "table": rows, "details": details,
        "finding": "non-floor time per iteration (step − floor): " + per_iter,
        "notes": ["step = train_step()+roles.reshard()+after_step() (cold start: one TTUR cycle, random stop off; RL: one epoch, "
                  "log steps off); floor = recorded passes replayed on the same modules (bench/passes.py)",
                  "ratio = median(step) / Σ count·median(pass) (the target metric); 'ratio min/min' = min(step) / "
                  "Σ count·min(pass) (quiet-machine estimate); 'per round' = median over rounds of step / that "
                  "round's replayed floor (adjacent in time, so load drift cancels)",
                  "non-floor time per iteration (step − floor): " + per_iter + ". It is per-op Python work "
                  "(CPS steps, loss algebra, NaN guards, broadcasts, EMA, data): a near-constant few ms per "
                  "iteration, so tiny models (toy2d's MLP) are far above the floor and the ratio approaches 1 "
                  "as the model grows",
                  "per-pass tables: below (and in results.json, details)"],
    }


def main(argv=None) -> int:
    from bench.common import item_main

    return item_main(run, argv, threads=True)


if __name__ == "__main__":
    sys.exit(main())
