"""Session fixtures of the flow tests: one shared local MLflow store + Metaflow datastore, and one
full toy2d flow run on the local profile that several tests read (and the fault-injection test
uses as its uninterrupted reference)."""
from __future__ import annotations

import pytest

from .helpers import TOY2D_FAST, assert_ok, flow_env, run_flow, run_id_of


@pytest.fixture(scope="session")
def flow_base(tmp_path_factory):
    return tmp_path_factory.mktemp("flow")


@pytest.fixture(scope="session")
def local_env(flow_base):
    """Environment of local-profile flow runs (shared store: MLflow's sqlite schema is created once)."""
    return flow_env(flow_base)


@pytest.fixture(scope="session")
def toy2d_run(local_env, flow_base):
    """``python flows/rtdmd_flow.py run --backbone toy2d`` (local profile, small step counts)."""
    res = run_flow(["run", "--backbone", "toy2d", "--overrides", TOY2D_FAST, "--max-workers", "2"], local_env,
                   timeout=1200, log=flow_base / "logs" / "toy2d_local.log")
    assert_ok(res, "toy2d flow (local profile)")
    return {"env": local_env, "run_id": run_id_of(res.stdout + res.stderr), "stdout": res.stdout,
            "stderr": res.stderr, "overrides": TOY2D_FAST}
