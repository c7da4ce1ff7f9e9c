"""The live training card: progress from a growing metrics.jsonl, polled while the stage runs."""
from __future__ import annotations

import json
import time

import pytest

from rtdmd.pipeline.live import LiveCard, describe, live_training_card, snapshot


class FakeCard:
    """What the live card uses of ``current.card``: append, clear, refresh."""

    def __init__(self):
        self.components, self.refreshes = [], 0

    def append(self, c):
        self.components.append(c)

    def clear(self):
        self.components = []

    def refresh(self):
        self.refreshes += 1


def _bar(live) -> dict:
    return live.bar.render()  # what the card shows


def _rows(*points, start_loss=1.0):
    return [{"step": s, "time/elapsed_s": e, "fake/ac": start_loss / (i + 1), "reward/mean": 0.1 * i}
            for i, (s, e) in enumerate(points)]


def test_snapshot_rate_eta_and_last_values():
    s = snapshot(_rows((10, 2.0), (20, 4.0)), total=100)
    assert (s["step"], s["fraction"]) == (20, 0.2)
    assert s["rate"] == pytest.approx(5.0) and s["eta_s"] == pytest.approx(16.0)
    assert s["last"] == {"fake/ac": 0.5, "reward/mean": pytest.approx(0.1)}
    assert describe(s) == "5 step/s, ETA 0:00:16"
    assert snapshot([], 100)["rate"] is None and describe(snapshot([], 100)) == "waiting for the first logging step"
    # a resumed run restarts the trainer's clock: the rate uses only the current invocation's rows
    resumed = snapshot(_rows((10, 50.0), (20, 100.0), (30, 3.0), (40, 13.0)), total=40)
    assert resumed["rate"] == pytest.approx(1.0) and resumed["eta_s"] == 0.0
    assert describe({"rate": 0.25, "eta_s": 3725}) == "4 s/step, ETA 1:02:05"


def test_live_card_follows_a_growing_metrics_file(tmp_path):
    pytest.importorskip("metaflow")
    card = FakeCard()
    live = LiveCard(card, str(tmp_path), "cold_start", total=40)
    assert len(card.components) == 4 and card.refreshes == 1
    assert not live.poll() and card.refreshes == 1  # no file yet: nothing to show
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        for row in _rows((10, 1.0)):
            f.write(json.dumps(row) + "\n")
    assert live.poll() and card.refreshes >= 2
    assert _bar(live)["value"] == 10 and "step/s" in _bar(live)["details"]
    assert not live.poll()  # nothing new: no refresh
    with open(path, "a") as f:
        f.write(json.dumps({"step": 20, "time/elapsed_s": 2.0, "fake/ac": 0.25}) + "\n")
    assert live.poll() and _bar(live)["value"] == 20 and "| fake/ac | 0.25 |" in live.values.render()["source"]


def test_context_polls_while_the_block_runs_and_clears_on_success(tmp_path, monkeypatch):
    pytest.importorskip("metaflow")

    class Ctx:
        params = {"cold_start": {"total_steps": 30}}
        cold_start_stop = None

        def layout(self):
            return type("L", (), {"stage_dir": staticmethod(lambda stage: str(tmp_path))})()

    card = FakeCard()
    with live_training_card(Ctx(), "cold_start", card=card, interval=0.05) as live:
        (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 15, "time/elapsed_s": 3.0, "fake/ac": 0.5}) + "\n")
        deadline = time.time() + 20
        while _bar(live)["value"] != 15 and time.time() < deadline:  # the polling thread picks it up
            time.sleep(0.05)
        assert _bar(live)["value"] == 15 and _bar(live)["max"] == 30
    assert card.components == []  # the step attaches its final card next
    card = FakeCard()
    with pytest.raises(RuntimeError):
        with live_training_card(Ctx(), "cold_start", card=card, interval=0.05):
            raise RuntimeError("stage failed")
    assert len(card.components) == 4  # a failed stage keeps its last live state
    with live_training_card(Ctx(), "cold_start", node_index=1, card=FakeCard()) as live:
        assert live is None  # only node 0 has the curves
