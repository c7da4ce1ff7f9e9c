"""Session fixtures of the digits tests: the digits models, built once per checkout (tests/digits/assets.py;
a run that collects these tests starts that build in the background at collection, tests/conftest.py)."""
from pathlib import Path

import pytest

from .assets import FIXTURE_PARTS, ensure_digits_assets


@pytest.fixture(scope="session")
def digits_rewards() -> Path:
    """Reward classifier + judge only (seconds)."""
    return ensure_digits_assets(FIXTURE_PARTS["digits_rewards"])


@pytest.fixture(scope="session")
def digits_assets(digits_rewards) -> Path:
    """Everything: VAE, teacher pipeline, rewards."""
    return ensure_digits_assets(FIXTURE_PARTS["digits_assets"])
