"""Helpers for the flow tests: an isolated environment for ``python flows/rtdmd_flow.py`` runs,
running the flow, and reading its results back (Metaflow client, MLflow, artifact root)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FLOW = ROOT / "flows" / "rtdmd_flow.py"
VENV_BIN = Path(sys.executable).parent
FLOW_NAME = "RtdmdFlow"

# small but meaningful toy2d settings (seconds per stage on 2 CPU processes)
TOY2D_FAST = ("cold_start.total_steps=300 cold_start.checkpoint.save_interval=100 cold_start.eval_interval=0 "
              "cold_start.log_interval=25 rl.epochs=24 rl.checkpoint.save_interval=4 rl.eval_interval=0 "
              "eval.num_prompts=3")


def flow_env(base: Path, **extra: str) -> dict[str, str]:
    """Environment of a flow run isolated under ``base`` (own Metaflow home/datastore, artifact root,
    MLflow store) and without the caller's METAFLOW_/MLFLOW_/RTDMD_/AWS_ settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("METAFLOW_", "MLFLOW_", "RTDMD_", "AWS_"))}
    (base / "mfhome").mkdir(parents=True, exist_ok=True)
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # local workers start as bare `python`
        "METAFLOW_USER": "rtdmd-test",  # Metaflow refuses to run as `root` or without a user name
        "METAFLOW_HOME": str(base / "mfhome"),
        "METAFLOW_DEFAULT_DATASTORE": "local",
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(base / "mf"),
        # @card output stays in this run's datastore (unset, Metaflow writes cards to <cwd>/.metaflow/mf.cards: the repo)
        "METAFLOW_CARD_LOCALROOT": str(base / "mf" / ".metaflow" / "mf.cards"),
        "METAFLOW_DEFAULT_METADATA": "local",
        "RTDMD_ARTIFACT_ROOT": str(base / "artifacts"),
        "RTDMD_CACHE_DIR": str(base / "cache"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow' / 'mlflow.db'}",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",  # short stages still get system metrics
        "OMP_NUM_THREADS": "1",
        "RTDMD_DETERMINISTIC": "1",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    })
    env.update(extra)
    return env


def run_flow(args: list[str], env: dict[str, str], *, timeout: float = 900, top: list[str] | None = None,
             log: Path | None = None) -> subprocess.CompletedProcess:
    """``python flows/rtdmd_flow.py [top-level opts] <args>`` from the repo root; output kept in ``log``."""
    cmd = [sys.executable, str(FLOW), *(top or []), *args]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=timeout)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(cmd)}\n# {time.time() - t0:.1f}s rc={res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def run_id_of(output: str) -> str:
    m = re.search(r"Workflow starting \(run-id ([^)]+)\)", output)
    assert m, f"no run id in output:\n{output[-3000:]}"
    return m.group(1)


def metaflow_run(env: dict[str, str], run_id: str):
    """The Metaflow client's Run (reads the isolated local datastore of ``env``)."""
    code = ("import json, sys\n"
            "from metaflow import Flow, namespace\n"
            "namespace(None)\n"
            f"run = Flow('{FLOW_NAME}')['{run_id}']\n"
            "out = {'successful': run.successful, 'finished': run.finished,\n"
            "       'steps': [s.id for s in run],\n"
            "       'data': {k: getattr(run['end'].task.data, k, None) for k in ('ctx', 'final', 'summary', 'matrix', 'rl_out', 'cold_start_out')}}\n"
            "ctx = out['data']['ctx']\n"
            "out['data']['ctx'] = ctx.to_dict() if ctx is not None else None  # the typed RunContext, as plain data\n"
            "sizes = {}\n"
            "for s in run:\n"
            "    for t in s:\n"
            "        for a in t.artifacts:\n"
            "            sizes[f'{s.id}/{a.id}'] = a.size if hasattr(a, 'size') else 0\n"
            "out['max_artifact'] = max(sizes.items(), key=lambda kv: kv[1]) if sizes else None\n"
            "print(json.dumps(out, default=str))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def mlflow_runs(env: dict[str, str], experiment: str) -> list[dict]:
    """Every run of ``experiment`` in the env's MLflow store: id, name, status, tags, metrics, parent."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    out = []
    for r in client.search_runs([exp.experiment_id], max_results=1000):
        out.append({"id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
                    "tags": dict(r.data.tags), "metrics": dict(r.data.metrics), "params": dict(r.data.params),
                    "parent": r.data.tags.get("mlflow.parentRunId")})
    return out


def list_artifacts(env: dict[str, str], run_id: str, path: str | None = None) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    return [f.path for f in client.list_artifacts(run_id, path)]


def assert_ok(res: subprocess.CompletedProcess, what: str = "flow") -> None:
    assert res.returncode == 0, f"{what} failed (rc={res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-8000:]}"


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with one worker (sqlite + local artifacts) for cluster-like tests."""

    def __init__(self, base: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base = base
        self.proc = None

    def __enter__(self) -> str:
        import urllib.request

        self.base.mkdir(parents=True, exist_ok=True)
        mlflow = VENV_BIN / "mlflow"
        cmd = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.base / 'mlflow.db'}",
               "--artifacts-destination", str(self.base / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        self.log = open(self.base / "server.log", "w")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 180
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.base / 'server.log').read_text()[-2000:]}")
            try:
                opener.open(self.url + "/health", timeout=2).close()
                return self.url
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("mlflow server did not start")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
