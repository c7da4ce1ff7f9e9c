"""Bad input fails in ``start`` with one clear message and before any training starts."""
from __future__ import annotations

import re
import socket

import pytest

from .helpers import ROOT, run_flow

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _typo_params(tmp_path):
    text = (ROOT / "params" / "toy2d.yaml").read_text()
    assert "  ema_decay: 0.99\n" in text
    path = tmp_path / "toy2d_typo.yaml"
    path.write_text(text.replace("  ema_decay: 0.99\n", "  ema_decy: 0.99\n", 1))
    return str(path)


CASES = {
    "unknown_backbone": (lambda tmp: (["--backbone", "flux3"], {}),
                         r"unknown backbone 'flux3'; valid backbones: .*toy2d"),
    "override_typo": (lambda tmp: (["--backbone", "toy2d", "--overrides", "rl.epochz=3"], {}),
                      r"unknown key 'rl\.epochz'"),
    "params_file_typo": (lambda tmp: (["--backbone", _typo_params(tmp)], {}),
                         r"toy2d_typo\.yaml: unknown key 'cold_start\.ema_decy'; did you mean 'ema_decay'"),
    "mlflow_unreachable": (lambda tmp: (["--backbone", "toy2d"], {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_free_port()}"}),
                           r"MLflow tracking server http://127\.0\.0\.1:\d+ is unreachable"),
    "s3_unreachable": (lambda tmp: (["--backbone", "toy2d"], {
        "RTDMD_ARTIFACT_ROOT": "s3://rtdmd-art/runs", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{_free_port()}",
        "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}),
        r"S3 endpoint http://127\.0\.0\.1:\d+ is unreachable"),
    "init_uri_missing": (lambda tmp: (["--backbone", "toy2d", "--stages", "rl,eval",
                                       "--cold-start-uri", str(tmp / "no" / "such" / "artifact")], {}),
                         r"--cold-start-uri .*/no/such/artifact does not exist or is incomplete"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_in_start(case, local_env, tmp_path, flow_base):
    make, pattern = CASES[case]
    args, extra = make(tmp_path)
    env = {**local_env, **extra}
    res = run_flow(["run", *args], env, timeout=300, log=flow_base / "logs" / f"bad_{case}.log")
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert re.search(pattern, out), out[-4000:]
    assert "RTDMD preflight check failed (nothing was trained)" in out
    assert "Step start (task-id" in out and "failed" in out
    # nothing after start ran: no other task started, no torchrun launched
    assert not re.search(r"/(prep|cold_start|rl|eval_variant)/\d+ \(pid \d+\)\] Task is starting", out)
    assert "torch.distributed.run" not in out
