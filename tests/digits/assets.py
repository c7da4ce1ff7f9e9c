"""The digits models (VAE, teacher pipeline, reward classifier + judge), built once per checkout.

Runs the same commands as the DVC stages ``digits_vae``, ``digits_teacher`` and ``digits_rewards``
when their outputs are missing (a fresh clone: about five single-core CPU minutes, then cached
under data/digits/, which is gitignored). The build holds ``build_lock(data/digits/models)``, so the
background prebuild that ``tests/conftest.py`` starts and the fixtures of ``tests/digits`` never
build twice: a fixture waits for a build in progress, then re-checks what is missing.

``python tests/digits/assets.py [vae pipeline rewards]`` builds those parts (all by default); the
prebuild runs it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "data" / "digits"
STEPS = [
    ("vae", "data/digits/vae/metrics.json",
     ["-m", "rtdmd.backbones.digits_build", "vae", "--out", "data/digits/vae", "--params", "params/digits_build.yaml"]),
    ("pipeline", "data/digits/pipeline/digits.json",
     ["-m", "rtdmd.backbones.digits_build", "teacher", "--vae", "data/digits/vae", "--out", "data/digits/pipeline",
      "--params", "params/digits_build.yaml"]),
    ("rewards", "data/digits/rewards/metrics.json", ["-m", "rtdmd.rewards.digits", "--out", "data/digits/rewards"]),
]
ALL = tuple(part for part, _, _ in STEPS)


def missing(parts=ALL) -> list[str]:
    return [part for part, marker, _ in STEPS if part in parts and not (ROOT / marker).is_file()]


def ensure_digits_assets(parts=ALL) -> Path:
    if missing(parts):
        if str(ROOT) not in sys.path:  # run as a script from tests/digits/
            sys.path.insert(0, str(ROOT))
        from rtdmd.artifacts.lock import build_lock

        with build_lock(DIGITS / "models"):  # lock file inside the gitignored data/digits/
            for part, marker, args in STEPS:
                if part in missing(parts):
                    subprocess.run([sys.executable, *args, "--force"], cwd=ROOT, check=True)
    return DIGITS


if __name__ == "__main__":
    ensure_digits_assets(tuple(sys.argv[1:]) or ALL)
