"""`rtdmd infer` writes images for a registered tiny_flux2 version — the same images as
`python -m rtdmd.infer` with the version's LoRA stack (the registered sampler settings and seeds)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rtdmd.registry import register_candidate

from .helpers import clean_env, make_stack, rtdmd_cli

PROMPTS = ["a red cube on a table", "a blue bicycle", "a castle at night"]


@pytest.mark.slow
def test_rtdmd_infer_registered_tiny_flux2(store, tmp_path):
    from rtdmd.config import load_params
    from rtdmd.eval.infer import run_inference

    params = load_params("tiny_flux2")
    cs, rl = make_stack(params, tmp_path / "stack", seed=5, scale=0.05)
    reg = register_candidate(artifact_uri=str(rl), params=params, tracking_uri=store)
    out = tmp_path / "out"
    args = ["infer", f"models:/rtdmd-tiny_flux2/{reg['version']}", *sum((["--prompt", p] for p in PROMPTS), []),
            "--batch-size", "2", "--seed", "7", "--out", str(out)]
    res = rtdmd_cli(args, clean_env(MLFLOW_TRACKING_URI=store, RTDMD_CACHE_DIR=str(tmp_path / "cache")))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"wrote 3 samples of rtdmd-tiny_flux2 v{reg['version']}" in res.stdout
    assert "infer rtdmd-tiny_flux2" in res.stderr  # the progress bar
    files = sorted(p.name for p in out.glob("0*.png"))
    assert files == ["000000.png", "000001.png", "000002.png"] and (out / "grid.png").is_file()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["model"]["version"] == reg["version"] and [s["stage"] for s in meta["model"]["stack"]] == ["cold_start", "rl"]
    assert meta["sampler"]["step_list"] == [float(s) for s in params.sampler.step_list]
    assert [s["seed"] for s in meta["samples"]] == [7, 8, 9]

    ref = run_inference(params, PROMPTS, tmp_path / "ref", lora=[str(rl)], seed=7, batch_size=3)
    assert [a["stage"] for a in ref["variant"]["artifacts"]] == ["cold_start", "rl"]
    for name in files:
        a = np.asarray(Image.open(out / name))
        b = np.asarray(Image.open(tmp_path / "ref" / name))
        assert a.shape == (32, 32, 3) and np.array_equal(a, b), name
