"""The three command lines share one preamble (rtdmd.cli.common): bad user input is one line
``<prog>: error: ...`` on stderr with exit status 2 and no traceback; a bug keeps its traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rtdmd.cli import common
from rtdmd.cli.eval import main as eval_main
from rtdmd.cli.infer import main as infer_main
from rtdmd.cli.main import main as rtdmd_main

ROOT = Path(__file__).resolve().parents[1]
BAD_CONFIG = {
    "rtdmd": (rtdmd_main, ["params", "show", "no_such_backbone"]),
    "python -m rtdmd.infer": (infer_main, ["--config", "no_such_backbone", "--prompt", "ring", "--out", "OUT"]),
    "python -m rtdmd.eval": (eval_main, ["--config", "no_such_backbone", "--variant", "t=teacher", "--out", "OUT"]),
}


@pytest.mark.parametrize("prog", sorted(BAD_CONFIG))
def test_bad_config_is_one_line_and_exit_2(prog, capsys, tmp_path):
    main, argv = BAD_CONFIG[prog]
    assert main([str(tmp_path / "x") if a == "OUT" else a for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: unknown backbone 'no_such_backbone'"), err
    assert not (tmp_path / "x").exists()


def test_bad_override_names_the_key(capsys):
    assert rtdmd_main(["params", "show", "toy2d", "rl.nope=3"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("rtdmd: error: ") and "unknown key 'rl.nope'" in line and "\n" not in line


def test_a_bug_keeps_its_traceback():
    ap = common.parser("prog", None)

    def boom(args):
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):
        common.run(ap, [], boom, log=False)


@pytest.mark.parametrize("prog", sorted(BAD_CONFIG))
def test_python_m_entry_points_go_through_the_shared_main(prog, tmp_path):
    """``python -m rtdmd.cli`` (the ``rtdmd`` script), ``rtdmd.infer`` and ``rtdmd.eval`` are shims over it."""
    module = {"rtdmd": "rtdmd.cli"}.get(prog, prog.replace("python -m ", ""))
    res = subprocess.run([sys.executable, "-m", module, *BAD_CONFIG[prog][1]], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "unknown backbone" in res.stderr, res.stderr
    assert not (tmp_path / "OUT").exists()  # nothing written
