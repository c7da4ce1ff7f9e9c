"""Bad input: unknown versions / aliases / models, an unreachable registry, malformed gate
definitions — each a clear one-line error (CLI: exit status 2), before anything moves."""
from __future__ import annotations

import time

import pytest

from rtdmd.cli import main as cli
from rtdmd.config import ConfigError, load_params
from rtdmd.registry import ModelRefError, RegistryUnreachable, load_registered, promote, register_candidate
from rtdmd.registry.client import parse_ref

from .helpers import ROOT, clean_env, evaluation, free_port, rtdmd_cli


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("rtdmd: error:"), err
    return lines[0]


def test_unknown_version_alias_and_model(store, toy_params, toy_stacks, capsys):
    register_candidate(artifact_uri=toy_stacks["a"][1], params=toy_params, evaluation=evaluation(0.5, 0.6, 0.4, 0.5),
                       tracking_uri=store)
    with pytest.raises(ModelRefError, match=r"version 7 of 'rtdmd-toy2d' does not exist.*versions: 1"):
        load_registered("models:/rtdmd-toy2d/7", tracking_uri=store)
    with pytest.raises(ModelRefError, match=r"alias 'champion' of 'rtdmd-toy2d' does not exist.*candidate->v1"):
        load_registered("toy2d@champion", tracking_uri=store)
    with pytest.raises(ModelRefError, match=r"registered model 'rtdmd-tiny_sd3' does not exist.*rtdmd-toy2d"):
        load_registered("tiny_sd3@champion", tracking_uri=store)
    with pytest.raises(ModelRefError, match="cannot parse model reference"):
        parse_ref("models:/rtdmd-toy2d")
    with pytest.raises(ModelRefError, match="not a LoRA artifact"):
        parse_ref(str(ROOT / "params"))
    assert cli(["promote", "--backbone", "toy2d", "--version", "9", "--tracking-uri", store]) == 2
    assert "version 9 of 'rtdmd-toy2d' does not exist" in _one_error_line(capsys.readouterr().err)
    assert cli(["infer", "toy2d@nope", "--prompt", "ring", "--out", str(store), "--tracking-uri", store]) == 2
    assert "alias 'nope'" in _one_error_line(capsys.readouterr().err)
    assert cli(["rollback", "--backbone", "toy2d", "--tracking-uri", store]) == 2
    assert "no champion to roll back" in _one_error_line(capsys.readouterr().err)
    assert cli(["history", "--backbone", "tiny_sd3", "--tracking-uri", store]) == 2
    assert "'rtdmd-tiny_sd3' does not exist" in _one_error_line(capsys.readouterr().err)


def test_unreachable_registry_fails_fast(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.time()
    with pytest.raises(RegistryUnreachable, match="unreachable"):
        promote("toy2d", tracking_uri=url)
    with pytest.raises(RegistryUnreachable):
        load_registered("toy2d@champion", tracking_uri=url)
    assert time.time() - t0 < 20  # not MLflow's minutes of HTTP retries
    res = rtdmd_cli(["history", "--backbone", "toy2d"], clean_env(MLFLOW_TRACKING_URI=url), timeout=120)
    assert res.returncode == 2
    line = _one_error_line(res.stderr)
    assert "model registry unreachable" in line and url in line, res.stderr


def test_malformed_gate_definitions(tmp_path, capsys):
    bad = {
        "registry.held_out_tolerance=-0.1": "held_out_tolerance must be a finite number >= 0",
        "registry.min_delta_vs_champion={nope: 0.1}": "registry gates name reward(s) ['nope'] that are not evaluated",
        "registry.min_delta_vs_cold_start={toy2d_target: fast}": "registry.min_delta_vs_cold_start.toy2d_target",
        "registry.required_rewards=[toy2d_target,toy2d_target]": "lists 'toy2d_target' twice",
        "registry.min_delta_vs_champion=[toy2d_target]": "expected dict[str, float]",
        "registry.held_out_tolerances={toy2d_target: .inf}": "has value inf; expected a finite number",
        "registry.gates=1": "unknown key 'registry.gates'",
    }
    for override, msg in bad.items():
        with pytest.raises(ConfigError, match=None) as err:
            load_params("toy2d", [override])
        assert msg in str(err.value), (override, str(err.value))
    # a params file with a typo'd gate key, through the CLI: one line, exit 2, nothing contacted
    text = (ROOT / "params" / "toy2d.yaml").read_text().replace("  min_delta_vs_champion:", "  min_delta_vs_champoin:")
    path = tmp_path / "toy2d.yaml"
    path.write_text(text)
    assert cli(["promote", "--backbone", str(path), "--tracking-uri", f"http://127.0.0.1:{free_port()}"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "unknown key 'registry.min_delta_vs_champoin'" in line and "did you mean 'min_delta_vs_champion'" in line
