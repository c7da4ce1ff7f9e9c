"""Helpers shared by the data tests (imported as a plain module: tests/data has no __init__)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

VENV_BIN = str(Path(sys.executable).parent)


def tool_env(extra: dict | None = None) -> dict:
    """Environment for child dvc/git/python processes: venv first on PATH, no analytics."""
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.update({
        "DVC_NO_ANALYTICS": "1", "DVC_NO_UPDATER": "1", "GX_ANALYTICS_ENABLED": "false",
        "GIT_AUTHOR_NAME": "rtdmd-test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "rtdmd-test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
        "OMP_NUM_THREADS": "1",
    })
    env.update(extra or {})
    return env


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env or tool_env(), capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


TINY_PARAMS = """\
sources: [src]
split_seed: 1
defaults:
  min_chars: 3
  eval_cap: 0
datasets:
  gv: {kind: geneval, eval_cap: 2}
"""

TINY_DVC_YAML = """\
stages:
  prepare:
    cmd: python -m rtdmd.data.prepare --source src --out prepared --params data.yaml
    deps:
      - src
    params:
      - data.yaml:
          - defaults
          - datasets
          - split_seed
    outs:
      - prepared
"""


def make_tiny_source(root: Path) -> None:
    write_bytes(root / "src" / "txt" / "train.txt", b"a red bicycle\na blue kite\na green bus\n")
    write_bytes(root / "src" / "txt" / "test.txt", b"a yellow boat\n")
    write_bytes(root / "src" / "gv" / "test_metadata.jsonl", jsonl([
        {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
        {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}],
         "prompt": "a photo of two cats"},
        {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}], "prompt": "a photo of a red cup"},
    ]))
