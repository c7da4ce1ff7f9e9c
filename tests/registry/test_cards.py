"""Card builders of the flow's training and evaluation steps (rtdmd.pipeline.cards), without a flow:
curves from metrics.jsonl, the last values, fixed-seed toy2d scatter grids, the evaluation table."""
from __future__ import annotations

import base64
import io
import json
import re
from types import SimpleNamespace

from PIL import Image


def card_payload(html: str) -> str:
    """The JSON the Metaflow card page renders (base64 in ``window.__MF_DATA__``), as text."""
    m = re.search(r'__MF_DATA__\["[^"]*"\]\s*=\s*"([^"]+)"', html)
    assert m, "no card data in the HTML"
    return base64.b64decode(m.group(1)).decode("utf-8", "replace")


def _rendered(components) -> list[dict]:
    return [json.loads(json.dumps(c.render(), default=str)) for c in components]


def _png(src: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1].strip())))


def test_training_card_curves_table_and_fixed_seed_scatter(tmp_path, toy_params, toy_stacks):
    from rtdmd.config.typed import to_mapping
    from rtdmd.pipeline import cards

    stage_dir = tmp_path / "rl"
    stage_dir.mkdir()
    with open(stage_dir / "metrics.jsonl", "w") as fh:
        for step in range(1, 21):
            fh.write(json.dumps({"step": step, "dm/loss": 1.0 / step, "fake/loss_ac": 2.0 - step * 0.05,
                                 "reward/toy2d_target": -3 + step * 0.02, "reward/num_prompts": 3.0,
                                 "time/epoch": 0.1}) + "\n")
    ctx = SimpleNamespace(params=to_mapping(toy_params), backbone="toy2d")  # the RunContext fields a card reads
    out = {"uri": toy_stacks["a"][1], "manifest": {"steps": 20, "world_size": 2, "metrics": {"reward": 0.5}},
           "mlflow_run_id": "abc"}
    comps = cards.training_card(ctx, "rl", out, stage_dir=str(stage_dir))
    kinds = [type(c).__name__ for c in comps]
    assert kinds.count("VegaChart") == 2 and "Image" in kinds and "Table" in kinds, kinds
    rendered = _rendered(comps)
    charts = [r for r in rendered if r.get("type") == "vegaChart"]
    losses = {v["metric"] for v in charts[0]["spec"]["data"]["values"]}
    rewards = {v["metric"] for v in charts[1]["spec"]["data"]["values"]}
    assert losses == {"dm/loss", "fake/loss_ac"} and rewards == {"reward/toy2d_target"}
    assert len(charts[0]["spec"]["data"]["values"]) == 40
    img = [r for r in rendered if r.get("type") == "image"][0]
    a = _png(img["src"])
    # fixed seeds: the same artifact gives the same scatter, another artifact a different one
    again = [c for c in cards.training_card(ctx, "rl", out, stage_dir=str(stage_dir)) if type(c).__name__ == "Image"][0]
    assert a.tobytes() == _png(again.render()["src"]).tobytes()
    other = cards.toy2d_scatter(toy_params, toy_stacks["b"][1], title="rl (seeds fixed)")
    assert other.size == a.size and other.tobytes() != a.tobytes()
    # non-zero nodes and skipped stages get a one-line card; errors never raise
    assert "node 1 of 2" in _rendered(cards.training_card(ctx, "rl", out, node_index=1, num_nodes=2))[0]["source"]
    assert "Not run" in _rendered(cards.training_card(ctx, "rl", None))[0]["source"]
    broken = cards.training_card(SimpleNamespace(params={"bad": 1}, backbone="toy2d"), "rl", out, stage_dir=str(stage_dir))
    assert any("samples unavailable" in r.get("source", "") for r in _rendered(broken))


def test_eval_card_table_chart_and_grids(tmp_path):
    from rtdmd.eval import report
    from rtdmd.pipeline import cards

    panels = []
    for name, dx in (("teacher-50", 0.0), ("rtdmd-4", 1.0)):
        import torch

        pts = {0: torch.tensor([[dx, 0.0], [0.5, 0.5]]), 1: torch.tensor([[-1.0, dx]])}
        (tmp_path / name / name).mkdir(parents=True)
        report.scatter_panel(pts, name).save(tmp_path / name / name / "grid_toy2d.png")
        panels.append({"name": name, "uri": str(tmp_path / name)})
    rows = [{"variant": "teacher-50", "kind": "teacher", "nfe": 50, "train/toy2d_target": -2.9, "mean": -2.4},
            {"variant": "rtdmd-4", "kind": "lora", "nfe": 4, "train/toy2d_target": -2.7, "mean": -2.2}]
    matrix = {"uri": "x/eval/matrix", "rows": rows, "markdown": "# Reward evaluation matrix — toy2d\n",
              "scores": {"teacher-50": {"toy2d_target": -2.9}, "rtdmd-4": {"toy2d_target": -2.7}},
              "training_rewards": ["toy2d_target"], "held_out_rewards": [], "mlflow_runs": {"rtdmd-4": "0123456789"}}
    rendered = _rendered(cards.eval_card(SimpleNamespace(backbone="toy2d"), matrix, panels))
    table = [r for r in rendered if r.get("type") == "table"][0]
    assert table["data"][1][0] == "rtdmd-4" and "train/toy2d_target" in table["columns"]
    chart = [r for r in rendered if r.get("type") == "vegaChart"][0]
    assert {v["variant"] for v in chart["spec"]["data"]["values"]} == {"teacher-50", "rtdmd-4"}
    grid = _png([r for r in rendered if r.get("type") == "image"][0]["src"])
    assert grid.width > 2 * 256  # the two variants side by side
    assert "No evaluation" in _rendered(cards.eval_card(SimpleNamespace(backbone="toy2d"), None))[0]["source"]
