"""Live training cards: the step's card refreshed while ``torchrun`` trains.

The trainer never imports Metaflow; it appends a row to ``<stage dir>/metrics.jsonl`` on every
logging step (``step``, ``time/elapsed_s`` and the step's metrics). While the stage runs, a thread
of the flow step's own process polls that file every ``interval`` seconds and, when rows were
added, updates the card's components — a progress bar (step of total, rate, ETA), the loss and
reward curves, the last logged values — and calls ``refresh()`` (Metaflow re-renders the card of a
running task every ``@card(refresh_interval=...)`` seconds at most).

When training ends the live components are cleared and the step attaches its final card
(:func:`rtdmd.pipeline.cards.training_card`); when it fails they stay, showing the last logged
step. A card error never fails the step.
"""
from __future__ import annotations

import math
import sys
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from rtdmd.pipeline.cards import LOSS_KEY, REWARD_KEY, curve_spec, read_metrics

if TYPE_CHECKING:
    from rtdmd.pipeline.context import RunContext

POLL_S = 15.0


def snapshot(rows: Sequence[Mapping[str, Any]], total: int) -> dict[str, Any]:
    """Progress of a stage from its logged rows: ``step`` (last logged), ``total``, ``fraction``,
    ``rate`` (steps/s), ``eta_s`` and the last logged values of the headline metrics (losses,
    rewards).

    The rate comes from the trainer's ``time/elapsed_s`` (seconds since that invocation started)
    over the rows of the current invocation — after a resume the clock restarts, so the rows
    before the restart are left out; a fresh run counts from step 0 at 0 s."""
    steps = [r for r in rows if isinstance(r.get("step"), (int, float))]
    if not steps:
        return {"step": 0, "total": total, "fraction": 0.0, "rate": None, "eta_s": None, "last": {}}
    step = int(steps[-1]["step"])
    timed = [(int(r["step"]), float(r["time/elapsed_s"])) for r in steps
             if isinstance(r.get("time/elapsed_s"), (int, float))]
    seg = timed[-1:]
    for point in reversed(timed[:-1]):
        if point[1] >= seg[0][1]:
            break  # the clock restarted after this row: an earlier invocation
        seg.insert(0, point)
    resumed = len(seg) < len(timed)
    first = (seg[0] if len(seg) >= 2 else None) if resumed else (0, 0.0)  # fresh: step 0 at 0 s
    rate = None
    if seg and first is not None and seg[-1][1] > first[1] and seg[-1][0] > first[0]:
        rate = (seg[-1][0] - first[0]) / (seg[-1][1] - first[1])
    values = {k: float(v) for r in steps for k, v in r.items()
              if isinstance(v, (int, float)) and k != "step" and (LOSS_KEY.search(k) or REWARD_KEY.search(k))}
    return {"step": step, "total": total, "fraction": min(1.0, step / total) if total else 0.0, "rate": rate,
            "eta_s": max(0.0, total - step) / rate if rate else None,
            "last": {k: v for k, v in sorted(values.items()) if math.isfinite(v)}}


def describe(s: Mapping[str, Any]) -> str:
    """One line: rate and ETA (``"4.1 step/s, ETA 0:02:10"``)."""
    if not s.get("rate"):
        return "waiting for the first logging step"
    rate = s["rate"]
    speed = f"{rate:.3g} step/s" if rate >= 1 else f"{1 / rate:.3g} s/step"
    eta = int(round(s["eta_s"] or 0))
    return f"{speed}, ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"


class LiveCard:
    """The components of a running stage on ``card`` (Metaflow's ``current.card`` or a double with
    ``append``, ``clear`` and ``refresh``), updated by :meth:`poll`."""

    def __init__(self, card, stage_dir: str, stage: str, total: int):
        from metaflow.cards import Markdown, ProgressBar, VegaChart

        self.card, self.stage_dir, self.stage, self.total = card, stage_dir, stage, total
        self.rows_seen = 0
        self.header = Markdown(f"# {stage} — training (live)\n\nstage dir `{stage_dir}`")
        self.bar = ProgressBar(max=max(1, total), label=f"{stage} steps", value=0, metadata=describe({}))
        self.curves = VegaChart(curve_spec([], [], f"{stage}: losses and rewards"))
        self.values = Markdown("*no metrics logged yet*")
        for c in (self.header, self.bar, self.curves, self.values):
            card.append(c)
        card.refresh()

    def poll(self) -> bool:
        """Re-read ``metrics.jsonl``; update the components and refresh the card when rows were added."""
        rows = read_metrics(self.stage_dir)
        if len(rows) == self.rows_seen:
            return False
        self.rows_seen = len(rows)
        s = snapshot(rows, self.total)
        self.bar.update(s["step"], metadata=describe(s))
        keys = list(s["last"])
        self.curves.update(curve_spec(rows, keys, f"{self.stage}: losses and rewards"))
        lines = ["| metric | last |", "|---|---|"] + [f"| {k} | {v:.5g} |" for k, v in s["last"].items()]
        self.values.update(f"**step {s['step']} of {s['total']}**\n\n" + "\n".join(lines))
        self.card.refresh()
        return True


@contextmanager
def live_training_card(ctx: RunContext, stage: str, node_index: int = 0, *, card=None,
                       interval: float = POLL_S) -> Iterator[LiveCard | None]:
    """Keep the step's card live while the block (the torchrun stage) runs; node 0 only."""
    live, stop, thread = None, threading.Event(), None
    try:
        if node_index == 0:
            if card is None:
                from metaflow import current

                card = current.card
            live = LiveCard(card, ctx.layout().stage_dir(stage), stage, stage_total(ctx, stage))

            def loop() -> None:
                while not stop.wait(interval):
                    _safely(live.poll)

            thread = threading.Thread(target=loop, name=f"rtdmd-live-card-{stage}", daemon=True)
            thread.start()
    except Exception as exc:  # noqa: BLE001 - no card (not a Metaflow task / no @card) or a card error
        print(f"[rtdmd] note: no live card for {stage}: {type(exc).__name__}: {exc}", file=sys.stderr)
        live = None
    ok = False
    try:
        yield live
        ok = True
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=30)
        if live is not None:
            _safely(live.poll)
            if ok:
                _safely(live.card.clear)  # the step attaches the final card next


def stage_total(ctx: RunContext, stage: str) -> int:
    """Steps of this stage run: RL epochs, or the cold start's steps (up to the milestone RL needs
    when the flow stops there)."""
    if stage == "rl":
        return int(ctx.params["rl"]["epochs"])
    total = int(ctx.params["cold_start"]["total_steps"])
    return min(total, ctx.cold_start_stop) if ctx.cold_start_stop else total


def _safely(fn) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - a card never fails the step
        print(f"[rtdmd] warning: live card update failed: {type(exc).__name__}: {exc}", file=sys.stderr)
