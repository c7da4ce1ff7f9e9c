"""The digits models (VAE, teacher pipeline, reward classifier + judge), built once per checkout.

The fixture runs the same commands as the DVC stages ``digits_vae``, ``digits_teacher`` and
``digits_rewards`` when their outputs are missing (a fresh clone: a few CPU minutes, then cached
under data/digits/, which is gitignored)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = [
    ("data/digits/vae/metrics.json",
     ["-m", "rtdmd.backbones.digits_build", "vae", "--out", "data/digits/vae", "--params", "params/digits_build.yaml"]),
    ("data/digits/pipeline/digits.json",
     ["-m", "rtdmd.backbones.digits_build", "teacher", "--vae", "data/digits/vae", "--out", "data/digits/pipeline",
      "--params", "params/digits_build.yaml"]),
    ("data/digits/rewards/metrics.json", ["-m", "rtdmd.rewards.digits", "--out", "data/digits/rewards"]),
]


def ensure_digits_assets(parts=("vae", "pipeline", "rewards")) -> Path:
    for marker, args in STEPS:
        if marker.split("/")[2] in parts and not (ROOT / marker).is_file():
            subprocess.run([sys.executable, *args, "--force"], cwd=ROOT, check=True)
    return ROOT / "data" / "digits"


@pytest.fixture(scope="session")
def digits_rewards() -> Path:
    """Reward classifier + judge only (seconds)."""
    return ensure_digits_assets(("rewards",))


@pytest.fixture(scope="session")
def digits_assets(digits_rewards) -> Path:
    """Everything: VAE, teacher pipeline, rewards."""
    return ensure_digits_assets()
