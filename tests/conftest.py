"""Repo-wide test settings: one thread (2 shared cores), offline hubs, repo root as cwd."""
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _repo_root_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


# Parallel runs (`make test` runs pytest-xdist with `--dist loadgroup`): the tests of a folder whose
# conftest builds session fixtures (a whole flow run, the digits models, a local S3 server, tiny
# DVC projects, reward checkpoints) share one worker, so each fixture is built once; the tests of
# every other folder are spread file by file.
SESSION_FIXTURE_DIRS = ("data", "digits", "eval", "flow", "registry", "rewards")


def xdist_group_of(path: Path) -> str:
    parts = path.resolve().relative_to(ROOT / "tests").parts
    if len(parts) > 1 and parts[0] in SESSION_FIXTURE_DIRS:
        return parts[0]
    return "/".join(parts)


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(name=xdist_group_of(Path(str(item.path)))))
