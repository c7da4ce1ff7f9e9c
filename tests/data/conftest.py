"""Fixtures of the data tests: a local S3 server, tiny DVC projects, prompt-file helpers."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data_helpers import TINY_DVC_YAML, TINY_PARAMS, make_tiny_source, run
from rtdmd.testing.s3server import local_s3_server, s3_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server on 127.0.0.1 (one per test session)."""
    with local_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_environ(s3_server, monkeypatch):
    """Point this process's boto3 at the local server (restored after the test)."""
    for k, v in s3_env(s3_server).items():
        monkeypatch.setenv(k, v)
    return s3_server


@pytest.fixture(scope="session")
def dvc_template(tmp_path_factory):
    """A tiny git+DVC project whose `prepare` stage has been reproduced once (copy it per test)."""
    root = tmp_path_factory.mktemp("dvc_template") / "proj"
    root.mkdir()
    run(["git", "init", "-q", "-b", "main"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "config", "core.analytics", "false"], root)
    make_tiny_source(root)
    (root / "data.yaml").write_text(TINY_PARAMS)
    (root / "dvc.yaml").write_text(TINY_DVC_YAML)
    run(["dvc", "repro", "-q"], root)
    assert (root / "prepared" / "manifest.json").is_file()
    return root


@pytest.fixture
def dvc_project(dvc_template, tmp_path):
    dest = tmp_path / "proj"
    shutil.copytree(dvc_template, dest, symlinks=True)
    return dest
