"""Fixtures of the registry tests: three toy2d LoRA stacks (session) and a fresh MLflow store per test."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from .helpers import copy_store, make_stack


@pytest.fixture(scope="session")
def session_dir():
    """Session scratch space outside pytest's basetemp (which concurrent pytest sessions on a shared
    machine rotate away while a long session still uses it)."""
    d = Path(tempfile.mkdtemp(prefix="rtdmd-registry-tests-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def toy_params():
    from rtdmd.config import load_params

    return load_params("toy2d")


@pytest.fixture(scope="session")
def toy_stacks(session_dir, toy_params):
    """``{name: (cold_start_uri, rl_uri)}`` for three different toy2d stacks."""
    base = session_dir / "toy_stacks"
    return {name: tuple(str(p) for p in make_stack(toy_params, base / name, seed=i + 1))
            for i, name in enumerate(("a", "b", "c"))}


@pytest.fixture(scope="session")
def store_template(session_dir):
    """An empty MLflow sqlite store with its schema created once."""
    from mlflow.tracking import MlflowClient

    d = session_dir / "mlflow_template"
    d.mkdir()
    uri = f"sqlite:///{d / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments()
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models()
    return d / "mlflow.db"


@pytest.fixture
def store(tmp_path, store_template, monkeypatch):
    """Tracking/registry URI of a fresh store; also the default for code that reads the env."""
    uri = copy_store(store_template, tmp_path / "mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("RTDMD_CACHE_DIR", str(tmp_path / "cache"))
    return uri
