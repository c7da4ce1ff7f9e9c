"""The digits build runs exactly the dvc.yaml stages that produce the files it checks for."""
from __future__ import annotations

import sys

import pytest

from rtdmd.data.dvc_workspace import DvcWorkspaceError, stage_cmd, stage_outs

from .assets import ROOT, STEPS, stage_argv


@pytest.mark.parametrize("part,marker,stage", STEPS)
def test_each_part_runs_its_dvc_stage_with_this_interpreter_and_checks_a_file_that_stage_writes(part, marker, stage):
    argv = stage_argv(stage)
    assert argv[0] == sys.executable and argv[1:3] == ["-m", stage_cmd(ROOT, stage).split()[2]]
    assert "--force" in argv  # a half-built part from an interrupted build is replaced
    assert any(marker.startswith(out.rstrip("/") + "/") for out in stage_outs(ROOT, stage)), (marker, stage)


def test_a_missing_stage_or_a_list_cmd_is_a_one_line_error(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages:\n  a:\n    cmd: [python -m x, python -m y]\n")
    with pytest.raises(DvcWorkspaceError, match=r"no stage 'digits_vae' \(stages: a\)"):
        stage_cmd(tmp_path, "digits_vae")
    with pytest.raises(DvcWorkspaceError, match="stage 'a' cmd is .*expected one command string"):
        stage_cmd(tmp_path, "a")
