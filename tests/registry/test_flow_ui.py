"""On a real toy2d flow run (local profile): the register step registered the final LoRA stack as a
candidate with its evaluation; `rtdmd promote --run <flow run>` gates it; `@champion` loads to
the flow's artifact; the training and evaluation steps carry Metaflow cards; and the MLflow UI,
started by `rtdmd ui` (one worker, 127.0.0.1) and opened in headless Chromium, shows the
evaluation runs side by side with the per-reward metrics, and the registered version's logged
MLflow model with its evaluation summary and signature (screenshots kept under test-artifacts/)."""
from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from .browser import Chromium, click_text, close_assistant, read_compare_view
from .helpers import ARTIFACT_DIR, ROOT, VENV_BIN, clean_env, free_port, rtdmd_cli

pytestmark = pytest.mark.slow

# small settings: the registry/UI/cards need a complete run, not meaningful numbers
FLOW_OVERRIDES = ("cold_start.total_steps=60 cold_start.checkpoint.save_interval=60 cold_start.eval_interval=0 "
                  "cold_start.log_interval=10 rl.epochs=3 rl.checkpoint.save_interval=3 rl.eval_interval=0 "
                  "eval.num_prompts=3")
REWARDS = ("toy2d_target", "toy2d_region", "mean")


@pytest.fixture(scope="module")
def flow_run():
    from tests.flow.helpers import flow_env, run_flow, run_id_of

    # not under pytest's basetemp: concurrent pytest sessions rotate (delete) old basetemp dirs,
    # and this run is read for minutes
    base = Path(tempfile.mkdtemp(prefix="rtdmd-registry-flow-"))
    # without METAFLOW_CARD_LOCALROOT the cards land in <cwd>/.metaflow/mf.cards (the repo)
    env = flow_env(base, METAFLOW_CARD_LOCALROOT=str(base / "mf" / ".metaflow" / "mf.cards"))
    res = run_flow(["run", "--backbone", "toy2d", "--overrides", FLOW_OVERRIDES, "--eval-args",
                    "--samples-per-prompt 128", "--max-workers", "2"], env, timeout=1500, log=base / "flow.log")
    ARTIFACT_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copy(base / "flow.log", ARTIFACT_DIR / "flow.log")
    if res.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"toy2d flow failed (log: {ARTIFACT_DIR / 'flow.log'}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    run_id = run_id_of(res.stdout + res.stderr)
    yield {"env": env, "run_id": run_id, "uri": env["MLFLOW_TRACKING_URI"],
           "run_dir": Path(env["RTDMD_ARTIFACT_ROOT"]) / "RtdmdFlow" / run_id}
    shutil.rmtree(base, ignore_errors=True)


def test_flow_registers_candidate_promote_load_and_cards(flow_run, tmp_path):
    from mlflow.tracking import MlflowClient

    from rtdmd.registry import load_registered

    uri, run_id, run_dir = flow_run["uri"], flow_run["run_id"], flow_run["run_dir"]
    client = MlflowClient(uri, uri)
    (mv,) = client.search_model_versions("name='rtdmd-toy2d'")
    assert {k: str(v) for k, v in client.get_registered_model("rtdmd-toy2d").aliases.items()} == {"candidate": str(mv.version)}
    tags = mv.tags
    assert tags["metaflow.run_id"] == run_id and tags["metaflow.pathspec"].startswith(f"RtdmdFlow/{run_id}/register/")
    assert tags["rtdmd.stack"] == "cold_start>rl" and tags["rtdmd.artifact_uri"] == str(run_dir / "rl" / "artifact")
    parent = client.get_run(mv.run_id)
    assert parent.data.tags["rtdmd.kind"] == "flow" and parent.data.tags["rtdmd.logical_run_id"] == run_id
    matrix = json.loads((run_dir / "eval" / "matrix" / "matrix.json").read_text())
    rec = json.loads(tags["rtdmd.eval"])
    assert rec["candidate"]["variant"] == "rtdmd-4" and rec["cold_start"]["variant"] == "cold_start-4"
    assert rec["candidate"]["scores"]["toy2d_target"] == pytest.approx(matrix["scores"]["rtdmd-4"]["toy2d_target"])

    # promotion of the version registered by this flow run, through the real console script
    env = clean_env(MLFLOW_TRACKING_URI=uri, RTDMD_CACHE_DIR=str(tmp_path / "cache"))
    res = rtdmd_cli(["promote", "--backbone", "toy2d", "--run", run_id], env)
    cand, cold = rec["candidate"]["scores"]["toy2d_target"], rec["cold_start"]["scores"]["toy2d_target"]
    if cand - cold >= 0:  # params/toy2d.yaml: registry.min_delta_vs_cold_start.toy2d_target = 0
        assert res.returncode == 0, res.stderr
    else:  # 3 RL epochs may not beat the cold start: refused, the gate named; then forced
        assert res.returncode == 2 and "vs_cold_start:toy2d_target" in res.stderr, res.stderr
        res = rtdmd_cli(["promote", "--backbone", "toy2d", "--run", run_id, "--force", "--reason", "test run"], env)
        assert res.returncode == 0, res.stderr
    hist = rtdmd_cli(["history", "--backbone", "toy2d"], env)
    assert hist.returncode == 0 and f"v{mv.version}" in hist.stdout and "champion -> v" in hist.stdout

    m = load_registered("models:/rtdmd-toy2d@champion", tracking_uri=uri, cache_dir=tmp_path / "cache")
    direct = load_registered(str(run_dir / "rl" / "artifact"))
    assert torch.equal(m.generate(["ring", "triangle"], seed=3), direct.generate(["ring", "triangle"], seed=3))

    # Metaflow cards of the training and evaluation steps. Read from the files: metaflow 2.19's card
    # client looks in <datastore root>/mf.cards while the writer, with a custom local datastore root,
    # uses <datastore root>/<Flow>/runs/... (METAFLOW_CARD_LOCALROOT is ignored); with the default
    # root (make demo) both are <cwd>/.metaflow/mf.cards and `card view` works.
    cards = {}
    for step, cid in (("cold_start", "training"), ("rl", "training"), ("eval_join", "evaluation")):
        found = sorted(Path(flow_run["env"]["METAFLOW_DATASTORE_SYSROOT_LOCAL"]).rglob(
            f"runs/{run_id}/steps/{step}/tasks/*/cards/blank-{cid}-*.html"))
        cards[step] = [p.read_text() for p in found]
    from .test_cards import card_payload

    for step in ("cold_start", "rl", "eval_join"):
        assert len(cards[step]) == 1, (step, len(cards[step]))
        text = card_payload(cards[step][0])
        ARTIFACT_DIR.mkdir(parents=True, exist_ok=True)
        (ARTIFACT_DIR / f"card_{step}.html").write_text(cards[step][0])
        if step == "eval_join":
            assert "Evaluation matrix" in text and "rtdmd-4" in text and "teacher-50" in text
            assert "reward per variant" in text and "Fixed-seed samples" in text and "image/png;base64" in text
        else:
            assert f"# {step}" in text and f"{step}: losses" in text and "Fixed-seed samples" in text
            assert "image/png;base64" in text


def _wait_url(proc: subprocess.Popen, timeout: float = 240) -> str:
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if "#/compare-runs?" in line:
            return line.strip()
    raise AssertionError("rtdmd ui printed no compare URL:\n" + "".join(lines))


def test_mlflow_compare_view_in_headless_chromium(flow_run, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, run_id = flow_run["uri"], flow_run["run_id"]
    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name("rtdmd-toy2d")
    evals = client.search_runs([exp.experiment_id], f"tags.`rtdmd.kind` = 'eval' and tags.`rtdmd.logical_run_id` = '{run_id}'")
    expected = {r.info.run_id: r for r in evals}
    assert {r.info.run_name for r in evals} == {"eval:teacher-50", "eval:teacher-4", "eval:cold_start-4", "eval:rtdmd-4"}

    port = free_port()
    proc = subprocess.Popen([str(VENV_BIN / "rtdmd"), "ui", "--tracking-uri", uri, "--port", str(port), "--backbone", "toy2d"],
                            cwd=str(ROOT), env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = _wait_url(proc)
        assert url.startswith(f"http://127.0.0.1:{port}/#/compare-runs?runs=")
        ARTIFACT_DIR.mkdir(parents=True, exist_ok=True)
        with Chromium(tmp_path / "chromium") as browser:
            browser.navigate(url)
            browser.wait_for("document.querySelectorAll('a[title=\"Plot chart\"]').length > 0 && "
                             "document.body.innerText.includes('Run Name:')", timeout=240)
            browser.evaluate("(() => { const b = [...document.querySelectorAll('button')]"
                             ".find(x => x.getAttribute('aria-label') === 'Close'); if (b) b.click(); return true; })()")
            browser.wait_for("document.querySelectorAll('.js-plotly-plot').length > 0", timeout=120)
            time.sleep(2)  # let the parallel-coordinates plot draw
            # screenshot first: the metric list is virtualised and reading it scrolls it (and MLflow
            # does not always re-sync its name column after a programmatic scroll)
            shot = browser.screenshot(ARTIFACT_DIR / "mlflow_compare.png")
            (ARTIFACT_DIR / "mlflow_compare.html").write_text(browser.html())
            page = read_compare_view(browser)
            model_page = _read_logged_model_page(browser, f"http://127.0.0.1:{port}", client)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

    # the variants side by side: one column per evaluation run, in the same order everywhere
    assert sorted(page["runIds"]) == sorted(expected), page["runIds"]
    assert page["runNames"] == [expected[i].info.run_name for i in page["runIds"]]
    for metric in REWARDS:
        shown = page["metrics"].get(metric)
        assert shown is not None and len(shown) == len(page["runIds"]), (metric, page["metrics"].keys())
        for col, rid in enumerate(page["runIds"]):
            value = expected[rid].data.metrics[metric]
            assert math.isclose(float(shown[col]), value, rel_tol=2e-3, abs_tol=2e-3), (metric, rid, shown[col], value)
    assert shot.stat().st_size > 20_000

    # the registered version's logged model: evaluation summary, the version, and the signature
    mv, text, mlmodel = model_page
    rec = json.loads(mv.tags["rtdmd.eval"])
    target = rec["candidate"]["scores"]["toy2d_target"]
    assert f"Evaluation ({rec['candidate']['variant']})" in text and "eval/toy2d_target" in text, text[:3000]
    assert f"{target:.4g}" in text and "sampler.step_list" in text and "Model versions" in text
    assert "rtdmd-toy2d" in text.split("Model versions", 1)[1] and f"v{mv.version}" in text.split("Model versions", 1)[1]
    assert "signature:" in mlmodel and '"shape": [-1, 2]' in mlmodel.replace("\n", " ").replace("  ", " ")
    assert '"name": "seed"' in mlmodel and "input_example.json" in mlmodel


def _read_logged_model_page(browser: Chromium, base: str, client) -> tuple:
    """Open the logged model behind the registered version (overview, then its MLmodel file) and
    return ``(model version, overview text, MLmodel text)``; screenshots of both pages."""
    (mv,) = client.search_model_versions("name='rtdmd-toy2d'")
    model_id = mv.source.removeprefix("models:/")
    url = f"{base}/#/experiments/{client.get_logged_model(model_id).experiment_id}/models/{model_id}"
    browser.navigate(url)
    browser.wait_for("document.body.innerText.includes('Model versions') && "
                     "document.body.innerText.includes('eval/toy2d_target')", timeout=180)
    close_assistant(browser)
    time.sleep(1)
    browser.screenshot(ARTIFACT_DIR / "mlflow_logged_model.png")
    text = browser.text()
    browser.navigate(url + "/artifacts")
    browser.wait_for("document.body.innerText.includes('input_example.json')", timeout=120)
    assert click_text(browser, "MLmodel") >= 1
    browser.wait_for("document.body.innerText.includes('signature:')", timeout=120)
    close_assistant(browser)
    time.sleep(1)
    browser.screenshot(ARTIFACT_DIR / "mlflow_logged_model_signature.png")
    return mv, text, browser.text()
