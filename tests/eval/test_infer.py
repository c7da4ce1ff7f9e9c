"""Inference CLI: prompts -> PNGs for the LoRA regimes none / distilled / distilled+RL."""
import csv
import json

import numpy as np
from PIL import Image

from rtdmd.config import load_params
from rtdmd.cli.infer import main
from rtdmd.eval.infer import run_inference
from .helpers import flux_params


def _flux_overrides():
    return [] if load_params("tiny_flux2").model.text_encoder_out_layers else ["model.text_encoder_out_layers=[1,2,3]"]


def _png(path):
    return np.asarray(Image.open(path))


def _same(a, b):
    """Equal up to the last float bit of batched kernels (at most 1 grey level, rarely)."""
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return d.max() <= 1 and d.mean() < 0.01


def test_lora_regimes_on_tiny_flux2(flux_chain, tmp_path):
    cs, rl = flux_chain
    prompts = ["a red cube", "a blue bicycle", "a castle"]
    ov = _flux_overrides()
    base = ["--config", "tiny_flux2", *(["--override", *ov] if ov else [])]
    common = [*sum((["--prompt", p] for p in prompts), []), "--steps", "4", "--eta", "0.9", "--seed", "42",
              "--batch-size", "2"]
    runs = {"none": [], "distilled": ["--lora", str(cs)], "distilled_rl": ["--lora", str(rl)],
            "explicit": ["--lora", str(cs), "--lora", str(rl)], "rl_only": ["--lora", str(rl), "--no-chain"]}
    for name, extra in runs.items():
        assert main([*base, *common, *extra, "--out", str(tmp_path / name)]) == 0
    for name in runs:
        files = sorted(p.name for p in (tmp_path / name).glob("0*.png"))
        assert files == ["000000.png", "000001.png", "000002.png"]
        assert _png(tmp_path / name / "000000.png").shape == (32, 32, 3) and (tmp_path / name / "grid.png").is_file()
    meta = json.loads((tmp_path / "distilled_rl" / "metadata.json").read_text())
    assert {"config", "num_images", "time_seconds_sum"} <= set(meta) and meta["num_images"] == 3
    assert [a["stage"] for a in meta["variant"]["artifacts"]] == ["cold_start", "rl"]
    assert meta["config"]["lora_paths"] == [str(cs), str(rl)] and meta["config"]["cps_eta"] == 0.9
    assert meta["config"]["prompts"] == prompts and [s["seed"] for s in meta["samples"]] == [42, 43, 44]
    assert json.loads((tmp_path / "none" / "metadata.json").read_text())["variant"]["artifacts"] == []
    img = {n: _png(tmp_path / n / "000001.png") for n in runs}
    assert _same(img["distilled_rl"], img["explicit"])  # the RL artifact brings its parent
    assert not _same(img["none"], img["distilled"])
    assert not _same(img["distilled"], img["distilled_rl"])
    assert not _same(img["rl_only"], img["distilled_rl"])


def test_batch_size_does_not_change_images(tmp_path):
    params = flux_params()
    a = run_inference(params, ["a cat", "a dog", "a cow"], tmp_path / "a", batch_size=1, seed=7)
    b = run_inference(params, ["a cat", "a dog", "a cow"], tmp_path / "b", batch_size=3, seed=7)
    assert a["num_images"] == b["num_images"] == 3
    for i in range(3):
        assert _same(_png(tmp_path / "a" / f"{i:06d}.png"), _png(tmp_path / "b" / f"{i:06d}.png"))


def test_teacher_and_toy2d(tmp_path):
    assert main(["--config", "toy2d", "--teacher", "--steps", "50", "--prompt", "ring", "--prompt", "square",
                 "--samples-per-prompt", "5", "--out", str(tmp_path / "toy")]) == 0
    with open(tmp_path / "toy" / "points.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 10 and [r["prompt"] for r in rows[:6]] == ["ring"] * 5 + ["square"]
    meta = json.loads((tmp_path / "toy" / "metadata.json").read_text())
    assert meta["config"]["mode"] == "normal" and meta["config"]["num_steps"] == 50 and meta["config"]["cps_eta"] == 0.0
    assert (tmp_path / "toy" / "grid.png").is_file()


def test_bad_input_exit_status(tmp_path, capsys, toy_chain):
    assert main(["--config", "toy2d", "--out", str(tmp_path / "x")]) == 2
    assert "no prompts given" in capsys.readouterr().err
    assert main(["--config", "toy2d", "--prompt", "ring", "--teacher", "--lora", str(toy_chain[1]),
                 "--out", str(tmp_path / "x")]) == 2
    assert "cannot be combined" in capsys.readouterr().err
    assert main(["--config", "toy2d", "--prompt", "a photo of a cat", "--out", str(tmp_path / "x")]) == 2
    assert "names no class" in capsys.readouterr().err
    assert main(["--config", "toy2d", "--prompt", "ring", "--lora", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--config", "toy2d", "--prompt", "ring", "--steps", "4", "--step-list", "1000,500",
                 "--out", str(tmp_path / "x")]) == 2
    assert main(["--config", "toy2d", "--prompt", "ring", "--eta", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--eta 2.0: expected a number in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
