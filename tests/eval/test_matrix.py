"""The evaluation matrix end to end (tiny_flux2: 2 variants x 3 rewards; toy2d) and its bad inputs."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rtdmd.config import load_params
from rtdmd.eval import EmptyPromptsError, EvalInputError, MissingDatasetError, VariantError, run_matrix
from .helpers import DRAWBENCH, flux_params

ROOT = Path(__file__).resolve().parents[2]


ROUTES = ("eval.reward_dataset_map.clipscore=drawbench", "eval.reward_dataset_map.pickscore=drawbench",
          "eval.reward_dataset_map.aesthetic=general")


def _flux(prompt_root, *extra):
    return flux_params(f"eval.datasets_root={prompt_root}", *ROUTES, *extra)


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory, prompt_root, flux_chain, reward_ckpt):
    out = tmp_path_factory.mktemp("flux_matrix")
    params = _flux(prompt_root)
    _, rl = flux_chain
    summary = run_matrix(params, ["teacher-4=teacher:steps=4", f"rtdmd-4=lora:{rl}"], out, reward_ckpt_dir=reward_ckpt)
    return params, out, summary


def test_tiny_flux2_matrix_writes_every_file(flux_run):
    params, out, summary = flux_run
    assert params.eval.num_prompts == 4  # drawbench (6 prompts) is capped to the first 4
    for name in ("metadata.json", "table.csv", "table.md", "grid_drawbench.png", "grid_general.png"):
        assert (out / name).is_file(), name
    for v in ("teacher-4", "rtdmd-4"):
        vdir = out / v
        assert sorted(p.name for p in vdir.glob("drawbench_*.png")) == [f"drawbench_{i:06d}.png" for i in range(4)]
        assert sorted(p.name for p in vdir.glob("general_*.png")) == [f"general_{i:06d}.png" for i in range(3)]
        assert Image.open(vdir / "drawbench_000000.png").size == (32, 32)
        assert (vdir / "grid_drawbench.png").is_file() and (vdir / "scores_general.csv").is_file()
    grid = Image.open(out / "grid_drawbench.png")
    assert grid.height > 2 * 96 and grid.width > 4 * 96  # 2 variant rows x 4 fixed-seed columns


def test_tiny_flux2_metadata_schema_and_scores(flux_run):
    params, out, summary = flux_run
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["config"]["name"] == "tiny_flux2"
    assert meta["num_images"] == 14 and meta["time_seconds_sum"] > 0
    assert set(meta["rewards"]) == {"clipscore", "pickscore", "aesthetic"}
    assert meta["rewards"]["aesthetic"]["dataset"] == "general" and meta["rewards"]["pickscore"]["dataset"] == "drawbench"
    assert meta["datasets"]["drawbench"]["num_prompts"] == 4 and meta["datasets"]["general"]["num_prompts"] == 3
    for name, entry in meta["variants"].items():
        s = entry["scores"]
        assert set(s) == {"clipscore", "pickscore", "aesthetic", "mean"}
        assert all(torch.isfinite(torch.tensor(x)) for x in s.values())
        assert s["mean"] == pytest.approx(s["clipscore"] + s["pickscore"] + s["aesthetic"])  # weighted sum, w=1
        assert entry["num_images"] == 7
    t4, rl = meta["variants"]["teacher-4"], meta["variants"]["rtdmd-4"]
    assert t4["sampler"] == {"step_list": [1000, 750, 500, 250], "num_steps": 4, "eta": 0.0,
                             "guidance": params.sampler.teacher_guidance, "teacher_mode": True, "role": "teacher"}
    assert rl["sampler"]["eta"] == params.sampler.eta and not rl["sampler"]["teacher_mode"]
    # the RL artifact's stack: cold start then RL, each with verified checksums
    assert [a["stage"] for a in rl["artifacts"]] == ["cold_start", "rl"] and t4["artifacts"] == []
    import hashlib

    for a in rl["artifacts"]:
        assert hashlib.sha256((Path(a["uri"]) / "manifest.json").read_bytes()).hexdigest() == a["manifest_sha256"]
        assert a["files"] and all(len(h) == 64 for h in a["files"].values())
    # per-variant metadata.json: the spec's schema (config, num_images, time_seconds_sum, scores)
    per = json.loads((out / "rtdmd-4" / "metadata.json").read_text())
    assert {"config", "num_images", "time_seconds_sum", "scores"} <= set(per)
    assert per["config"]["mode"] == "distilled" and per["config"]["num_steps"] == 4
    assert per["config"]["lora_paths"] == [a["uri"] for a in rl["artifacts"]]
    assert per["scores"] == rl["scores"] and per["variant"]["artifacts"] == rl["artifacts"]
    assert summary["scores"]["rtdmd-4"] == pytest.approx(rl["scores"])


def test_held_out_report(flux_run):
    _, out, summary = flux_run
    assert summary["training_rewards"] == ["clipscore", "pickscore"]  # rl.reward_weights of tiny_flux2
    assert summary["held_out_rewards"] == ["aesthetic"]
    with open(out / "table.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["variant"] for r in rows] == ["teacher-4", "rtdmd-4"]
    cols = list(rows[0])
    assert cols.index("train/clipscore") < cols.index("train/weighted_sum") < cols.index("held_out/aesthetic") \
        < cols.index("held_out/weighted_sum") < cols.index("mean")
    assert float(rows[1]["held_out/aesthetic"]) == pytest.approx(summary["scores"]["rtdmd-4"]["aesthetic"])
    md = (out / "table.md").read_text()
    train_part, held_part = md.split("## Training rewards")[1].split("## Held-out rewards")
    held_part = held_part.split("## All rewards")[0]
    assert "clipscore" in train_part and "aesthetic" not in train_part
    assert "aesthetic" in held_part and "| clipscore" not in held_part


def test_scores_match_the_saved_images_and_fixed_seeds(flux_run, reward_ckpt):
    """Per-image scores are reproducible from the written PNGs; image i uses seed eval.seed + i."""
    from rtdmd.backbones import build_backbone
    from rtdmd.rewards import MultiScorer
    from rtdmd.sampling import generate

    params, out, _ = flux_run
    with open(out / "teacher-4" / "scores_drawbench.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["prompt"] for r in rows] == DRAWBENCH[:4]
    imgs = torch.stack([torch.from_numpy(np.array(Image.open(out / "teacher-4" / f"drawbench_{i:06d}.png")))
                        .permute(2, 0, 1).float() / 255 for i in range(4)])
    got = MultiScorer({"pickscore": 1.0}, ckpt_dir=reward_ckpt)(imgs, DRAWBENCH[:4])["pickscore"]
    assert got.tolist() == pytest.approx([float(r["pickscore"]) for r in rows], abs=1e-4)
    bb = build_backbone(params)
    x = generate(bb, bb.load_transformer("teacher"), [DRAWBENCH[2]], step_list=[1000, 750, 500, 250], eta=0.0,
                 seed=[params.eval.seed + 2], guidance=params.sampler.teacher_guidance, teacher_mode=True)
    # same noise; batched vs single kernels may differ in the last float bit -> at most 1 grey level
    diff = ((x[0].clamp(0, 1) * 255).round() - (imgs[2] * 255).round()).abs()
    assert diff.max() <= 1 and diff.mean() < 0.01


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def no_models(monkeypatch):
    """Bad input must be reported before any model is built."""
    import rtdmd.backbones

    def boom(*a, **k):
        raise AssertionError("a model was built before the input was validated")

    monkeypatch.setattr(rtdmd.backbones, "build_backbone", boom)


def test_dataset_missing_for_a_routed_reward(prompt_root, reward_ckpt, tmp_path, no_models):
    params = _flux(prompt_root, "eval.reward_dataset_map.aesthetic=hpsv3_missing")
    with pytest.raises(MissingDatasetError) as err:
        run_matrix(params, ["t=teacher:steps=2"], tmp_path / "o", reward_ckpt_dir=reward_ckpt)
    assert "hpsv3_missing" in str(err.value) and "aesthetic" in str(err.value)
    assert not (tmp_path / "o").exists()


def test_empty_prompt_list(prompt_root, reward_ckpt, tmp_path, no_models):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "test.txt").write_text("\n")
    params = flux_params(f"eval.datasets_root={tmp_path}", "eval.reward_dataset_map.aesthetic=empty",
                         "eval.reward_dataset_map.pickscore=empty", "eval.reward_dataset_map.clipscore=empty")
    with pytest.raises(EmptyPromptsError, match="no prompts"):
        run_matrix(params, ["t=teacher:steps=2"], tmp_path / "o", reward_ckpt_dir=reward_ckpt)


def test_unknown_and_mismatched_rewards_and_bad_variants(prompt_root, reward_ckpt, tmp_path, no_models):
    params = _flux(prompt_root)
    with pytest.raises(EvalInputError, match="unknown reward.*nope"):
        run_matrix(params, ["t=teacher"], tmp_path, ["nope"])
    with pytest.raises(EvalInputError, match="score points"):
        run_matrix(params, ["t=teacher"], tmp_path, ["toy2d_target"])
    with pytest.raises(VariantError, match="unknown kind"):
        run_matrix(params, ["t=student"], tmp_path, reward_ckpt_dir=reward_ckpt)
    with pytest.raises(VariantError, match="does not exist"):
        run_matrix(params, [f"t=lora:{tmp_path / 'missing'}"], tmp_path, reward_ckpt_dir=reward_ckpt)


def test_unavailable_reward_fails_or_is_reported(prompt_root, reward_ckpt, tmp_path, no_models):
    from rtdmd.rewards import MissingCheckpointError

    params = _flux(prompt_root)
    with pytest.raises(MissingCheckpointError):
        run_matrix(params, ["t=teacher"], tmp_path, ["hpsv2"], reward_ckpt_dir=reward_ckpt)
    with pytest.raises(EvalInputError, match="no reward could be built.*hpsv2"):
        run_matrix(params, ["t=teacher"], tmp_path, ["hpsv2"], reward_ckpt_dir=reward_ckpt, allow_unavailable=True)


def test_cli_exit_status_on_bad_input(prompt_root, tmp_path, capsys, no_models):
    from rtdmd.eval.__main__ import main

    extra = [] if load_params("tiny_flux2").model.text_encoder_out_layers else ["model.text_encoder_out_layers=[1,2,3]"]
    rc = main(["--config", "tiny_flux2", "--override", f"eval.datasets_root={tmp_path}", *extra,
               "--variant", "t=teacher", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "error: dataset '" in err and "no prompt file in" in err


# ----------------------------------------------------------------------------- toy2d
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, toy_chain):
    out = tmp_path_factory.mktemp("toy_matrix")
    cs, rl = toy_chain
    params = load_params("toy2d", [f"eval.datasets_root={out / 'no_prompts_here'}"])  # builtin toy2d prompts
    variants = ["teacher-50=teacher", "teacher-4=teacher:steps=4", f"cold-start-4=lora:{cs}", f"rtdmd-4=lora:{rl}"]
    return params, out, run_matrix(params, variants, out, samples_per_prompt=256, tilt_betas=[0.0, 1.0])


def test_toy2d_matrix_files_and_metrics(toy_run):
    params, out, summary = toy_run
    for name in ("metadata.json", "table.csv", "table.md", "grid_toy2d.png"):
        assert (out / name).is_file()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["datasets"]["toy2d"]["num_prompts"] == 3 and meta["datasets"]["toy2d"]["samples_per_prompt"] == 256
    assert meta["training_rewards"] == ["toy2d_target", "toy2d_region"] and meta["held_out_rewards"] == []
    assert meta["toy2d"]["tilt_betas"] == [0.0, 1.0] and meta["toy2d"]["teacher_reference"]["steps"] == 50
    v = meta["variants"]
    assert [a["stage"] for a in v["rtdmd-4"]["artifacts"]] == ["cold_start", "rl"]
    for name, e in v.items():
        m = e["toy2d"]["mean"]
        assert {"swd_teacher", "mmd_teacher", "coverage", "swd_tilted_beta_0", "mmd_tilted_beta_1",
                "best_tilt_beta"} <= set(m)
        assert set(e["toy2d"]["per_dataset"]["toy2d"]["per_class"]) == {"0", "1", "2"}
        assert e["num_images"] == 768 and 0.0 <= e["scores"]["toy2d_region"] <= 1.0
        assert e["scores"]["mean"] == pytest.approx(e["scores"]["toy2d_target"] + e["scores"]["toy2d_region"])
    # known answers: the 50-step teacher matches the independent 50-step reference (noise floor) and the
    # data (beta = 0) better than the 4-step Euler teacher, and covers every mode
    t50, t4 = v["teacher-50"]["toy2d"]["mean"], v["teacher-4"]["toy2d"]["mean"]
    assert t50["swd_teacher"] < t4["swd_teacher"] and t50["swd_tilted_beta_0"] < 0.2 and t50["coverage"] == 1.0
    md = (out / "table.md").read_text()
    assert "## toy2d distribution metrics" in md and "(none: every evaluated reward was used in training)" in md
    with open(out / "rtdmd-4" / "points_toy2d.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 768
    assert Image.open(out / "grid_toy2d.png").width > 5 * 256  # teacher ref, tilted target, 4 variants


def test_toy2d_samples_use_per_index_seeds(toy_run):
    """Sample i of every variant uses seed eval.seed + i: regenerate a few directly."""
    from rtdmd.backbones import build_backbone
    from rtdmd.sampling import generate

    params, out, _ = toy_run
    with open(out / "teacher-4" / "points_toy2d.csv") as fh:
        rows = list(csv.DictReader(fh))
    bb = build_backbone(params)
    pick = [0, 300, 767]
    x = generate(bb, bb.load_transformer("teacher"), [rows[i]["prompt"] for i in pick], step_list=[1000, 750, 500, 250],
                 eta=0.0, seed=[params.eval.seed + i for i in pick], guidance=params.sampler.teacher_guidance,
                 teacher_mode=True)
    want = torch.tensor([[float(rows[i]["x"]), float(rows[i]["y"])] for i in pick])
    assert torch.allclose(x, want, atol=1e-5)


@pytest.mark.slow
def test_toy2d_under_torchrun_matches_one_process(toy_chain, tmp_path):
    """Two ranks (gloo): prompts sharded without padding, gathered to rank 0 — identical numbers."""
    _, rl = toy_chain
    variants = ["teacher-4=teacher:steps=4", f"rtdmd-4=lora:{rl}"]
    one = run_matrix(load_params("toy2d"), variants, tmp_path / "one", samples_per_prompt=64, tilt_betas=[1.0])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rtdmd.eval",
           "--config", "toy2d", "--out", str(tmp_path / "two"), "--samples-per-prompt", "64", "--tilt-betas", "1.0",
           "--quiet", *sum((["--variant", v] for v in variants), [])]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metadata.json").read_text())
    assert two["settings"]["world_size"] == 2 and two["num_images"] == one["num_images"] == 2 * 192
    for v in ("teacher-4", "rtdmd-4"):
        assert two["scores"][v] == pytest.approx(one["scores"][v], abs=1e-5)
        assert two["variants"][v]["toy2d"]["mean"] == pytest.approx(one["variants"][v]["toy2d"]["mean"], abs=1e-5)

    def points(d):
        with open(tmp_path / d / "rtdmd-4" / "points_toy2d.csv") as fh:
            rows = list(csv.DictReader(fh))
        return [r["prompt"] for r in rows], torch.tensor([[float(r["x"]), float(r["y"])] for r in rows])

    (p1, x1), (p2, x2) = points("one"), points("two")
    assert p1 == p2 and torch.allclose(x1, x2, atol=1e-5)  # same samples up to float rounding


def test_mlflow_one_run_per_variant_with_one_metric_per_reward(flux_run, tmp_path):
    from rtdmd.eval.report import log_to_mlflow, mlflow_runs

    _, out, summary = flux_run
    runs = {r["name"]: r for r in mlflow_runs(summary)}
    assert set(runs) == {"eval/teacher-4", "eval/rtdmd-4"}
    m = runs["eval/rtdmd-4"]["metrics"]
    assert {"clipscore", "pickscore", "aesthetic", "mean", "train_weighted_sum", "held_out_weighted_sum"} <= set(m)
    assert runs["eval/rtdmd-4"]["tags"]["rtdmd.eval.held_out_rewards"] == "aesthetic"
    mlflow = pytest.importorskip("mlflow")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("eval-test")
    with mlflow.start_run(run_name="parent") as parent:
        ids = log_to_mlflow(summary, out)
    client = mlflow.tracking.MlflowClient()
    got = {client.get_run(i).data.tags["rtdmd.eval.variant"]: client.get_run(i) for i in ids}
    assert set(got) == {"teacher-4", "rtdmd-4"}
    run = got["rtdmd-4"]
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.metrics["aesthetic"] == pytest.approx(summary["scores"]["rtdmd-4"]["aesthetic"])
    assert run.data.params["kind"] == "lora"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metadata.json", "table.csv", "table.md", "grids"} <= arts


def test_no_images_keeps_grids_and_scores(prompt_root, reward_ckpt, tmp_path, capsys):
    params = _flux(prompt_root)
    s = run_matrix(params, ["t1=teacher:steps=1"], tmp_path, ["clipscore"], reward_ckpt_dir=reward_ckpt,
                   save_images=False, grid_size=2)
    n = s["datasets"]["drawbench"]["num_prompts"]  # one sample per prompt, all on this one rank
    bar = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("eval t1 / drawbench: 100%")]
    assert len(bar) == 1 and re.search(rf" {n}/{n} \[.*(sample/s|s/sample)", bar[0]), bar  # rate and ETA
    assert list(s["rewards"]) == ["clipscore"] and s["held_out_rewards"] == []
    assert not list((tmp_path / "t1").glob("drawbench_*.png"))
    assert (tmp_path / "grid_drawbench.png").is_file() and (tmp_path / "t1" / "scores_drawbench.csv").is_file()
    assert Image.open(tmp_path / "grid_drawbench.png").width < 4 * 96  # 2 fixed-seed columns only


@pytest.mark.slow
def test_tiny_flux2_under_torchrun_writes_identical_images(prompt_root, reward_ckpt, flux_chain, tmp_path):
    """Images are generated on two ranks (3 prompts: 2 + 1, no padding), gathered and written by rank 0."""
    cs, _ = flux_chain
    ov = [f"eval.datasets_root={prompt_root}", *ROUTES]
    if load_params("tiny_flux2").model.text_encoder_out_layers is None:
        ov.append("model.text_encoder_out_layers=[1,2,3]")
    one = run_matrix(flux_params(*ov), [f"cs-4=lora:{cs}"], tmp_path / "one", ["aesthetic"], reward_ckpt_dir=reward_ckpt)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rtdmd.eval",
           "--config", "tiny_flux2", "--override", *ov, "--rewards", "aesthetic", "--reward-ckpt", str(reward_ckpt),
           "--variant", f"cs-4=lora:{cs}", "--out", str(tmp_path / "two"), "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metadata.json").read_text())
    assert two["settings"]["world_size"] == 2 and two["num_images"] == 3
    assert two["scores"]["cs-4"] == pytest.approx(one["scores"]["cs-4"], abs=1e-4)
    for i in range(3):  # the same images up to the last float bit of batched kernels (<= 1 grey level)
        name = f"general_{i:06d}.png"
        a = np.asarray(Image.open(tmp_path / "one" / "cs-4" / name), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "two" / "cs-4" / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1 and np.abs(a - b).mean() < 0.01


def test_toy2d_matrix_dvc_metrics_and_plots(toy_run, tmp_path):
    """The matrix's metrics.json / dvc_plots render through the real `dvc metrics show` and
    `dvc plots show`, at the paths the repository's dvc.yaml declares."""
    import shutil

    import yaml

    from rtdmd.pipeline.evaluation import DVC_LATEST

    _, out, summary = toy_run
    root = Path(__file__).resolve().parents[2]
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    assert spec["metrics"] == [f"{DVC_LATEST}/metrics.json"]
    proj = tmp_path / "proj"
    (proj / DVC_LATEST).mkdir(parents=True)
    shutil.copy(out / "metrics.json", proj / DVC_LATEST / "metrics.json")
    shutil.copytree(out / "dvc_plots", proj / DVC_LATEST / "dvc_plots")
    (proj / "dvc.yaml").write_text(yaml.safe_dump({"metrics": spec["metrics"], "plots": spec["plots"]}))

    def dvc(*args):
        res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=proj, capture_output=True, text=True,
                             env={**os.environ, "DVC_NO_ANALYTICS": "1"})
        assert res.returncode == 0, res.stderr
        return res.stdout

    dvc("init", "--no-scm", "-q")
    shown = json.loads(dvc("metrics", "show", "--json"))[""]["data"][f"{DVC_LATEST}/metrics.json"]["data"]
    assert set(shown) == set(summary["variants"])
    for name, e in summary["variants"].items():
        assert shown[name]["train/toy2d_target"] == pytest.approx(e["scores"]["toy2d_target"])
        assert shown[name]["toy2d/swd_teacher"] == pytest.approx(e["toy2d"]["mean"]["swd_teacher"])
    plots = json.loads(dvc("plots", "show", "--json"))["data"]
    bars = plots[f"{DVC_LATEST}/dvc_plots/train.toy2d_target.csv"][0]["content"]
    assert bars["mark"]["type"] == "bar" and bars["encoding"]["y"]["field"] == "variant"
    values = {d["variant"]: float(d["value"]) for d in bars["data"]["values"]}
    assert values == pytest.approx({n: e["scores"]["toy2d_target"] for n, e in summary["variants"].items()})
