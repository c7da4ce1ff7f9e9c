"""The digits models (VAE, teacher pipeline, reward classifier + judge), built once per checkout.

Runs the ``cmd`` of the DVC stages ``digits_vae``, ``digits_teacher`` and ``digits_rewards`` (read
from ``dvc.yaml``, with this interpreter for ``python``) when their outputs are missing (a fresh
clone: about five single-core CPU minutes, then cached under data/digits/, which is gitignored). The build holds ``build_lock(data/digits/models)``, so the
background prebuild that ``tests/conftest.py`` starts and the fixtures of ``tests/digits`` never
build twice: a fixture waits for a build in progress, then re-checks what is missing.

``python tests/digits/assets.py [vae pipeline rewards]`` builds those parts (all by default); the
prebuild runs it."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "data" / "digits"
STEPS = [  # (part, file that marks it built, dvc.yaml stage)
    ("vae", "data/digits/vae/metrics.json", "digits_vae"),
    ("pipeline", "data/digits/pipeline/digits.json", "digits_teacher"),
    ("rewards", "data/digits/rewards/metrics.json", "digits_rewards"),
]
ALL = tuple(part for part, _, _ in STEPS)
FIXTURE_PARTS = {"digits_assets": ALL, "digits_rewards": ("rewards",)}  # the fixtures of tests/digits/conftest.py


def parts_for(fixtures) -> tuple[str, ...]:
    """The parts the given fixture names need, in build order."""
    need = {part for name in fixtures for part in FIXTURE_PARTS.get(name, ())}
    return tuple(part for part in ALL if part in need)


def missing(parts=ALL) -> list[str]:
    return [part for part, marker, _ in STEPS if part in parts and not (ROOT / marker).is_file()]


def stage_argv(stage: str) -> list[str]:
    """The stage's ``dvc.yaml`` command, run by this interpreter (the tests' venv, not PATH's python)."""
    from rtdmd.data.dvc_workspace import stage_cmd

    argv = shlex.split(stage_cmd(ROOT, stage))
    if argv[0] != "python":
        raise ValueError(f"dvc.yaml stage {stage}: cmd starts with {argv[0]!r}; expected 'python'")
    return [sys.executable, *argv[1:]]


def ensure_digits_assets(parts=ALL) -> Path:
    if missing(parts):
        if str(ROOT) not in sys.path:  # run as a script from tests/digits/
            sys.path.insert(0, str(ROOT))
        from rtdmd.artifacts.lock import build_lock

        with build_lock(DIGITS / "models"):  # lock file inside the gitignored data/digits/
            for part, _, stage in STEPS:
                if part in missing(parts):
                    subprocess.run(stage_argv(stage), cwd=ROOT, check=True)
    return DIGITS


if __name__ == "__main__":
    ensure_digits_assets(tuple(sys.argv[1:]) or ALL)
