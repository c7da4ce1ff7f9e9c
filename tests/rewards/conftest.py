"""Fixtures for the reward tests: offline, one thread, one shared tiny checkpoint directory."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_ckpt_env(monkeypatch):
    """Tests pass ckpt_dir explicitly unless they set the variable themselves."""
    monkeypatch.delenv("RTDMD_REWARD_CKPT_PATH", raising=False)
    monkeypatch.delenv("RTDMD_REWARD_ALLOW_HUB", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from rtdmd.rewards.tiny import build_tiny_reward_checkpoints

    return build_tiny_reward_checkpoints(tmp_path_factory.mktemp("reward_ckpts"))


@pytest.fixture(scope="session")
def tiny_scorers(tiny_ckpt):
    """Each tiny neural scorer built once through the real loader."""
    from rtdmd.rewards import get_scorer

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = get_scorer(name, ckpt_dir=tiny_ckpt)
        return cache[name]

    return get


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 64, 80, generator=g)


PROMPTS = ["a red cat on a sofa", "two dogs", 'a sign that says "hello"']


@pytest.fixture
def prompts():
    return list(PROMPTS)
