"""Fixtures for the evaluation tests: tiny params, LoRA artifact chains, prompt dirs, reward ckpts."""
from __future__ import annotations

import pytest

from rtdmd.config import load_params

from .helpers import DRAWBENCH, GENERAL, flux_params, make_lora_chain


@pytest.fixture(autouse=True)
def _no_reward_env(monkeypatch):
    monkeypatch.delenv("RTDMD_REWARD_CKPT_PATH", raising=False)
    monkeypatch.delenv("RTDMD_REWARD_ALLOW_HUB", raising=False)


@pytest.fixture(scope="session")
def toy_chain(tmp_path_factory):
    return make_lora_chain(load_params("toy2d"), tmp_path_factory.mktemp("toy_lora"))


@pytest.fixture(scope="session")
def flux_chain(tmp_path_factory):
    return make_lora_chain(flux_params(), tmp_path_factory.mktemp("flux_lora"), scale=0.5)


@pytest.fixture(scope="session")
def prompt_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    (root / "drawbench").mkdir()
    (root / "drawbench" / "test.txt").write_text("\n".join(DRAWBENCH))
    (root / "general").mkdir()
    (root / "general" / "test.txt").write_text("\n".join(GENERAL) + "\n")
    return root


@pytest.fixture(scope="session")
def reward_ckpt(tmp_path_factory):
    from rtdmd.rewards.tiny import build_tiny_reward_checkpoints

    return build_tiny_reward_checkpoints(tmp_path_factory.mktemp("reward_ckpts"),
                                         names=["pickscore", "clipscore", "aesthetic"])
