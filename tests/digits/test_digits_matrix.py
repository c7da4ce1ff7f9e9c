"""The evaluation matrix on digits: judge metrics, the teacher reference and the per-class grids."""
import json

from rtdmd.config import load_params
from rtdmd.eval.matrix import run_matrix


def test_matrix_reports_digits_metrics_and_grids(digits_assets, tmp_path):
    params = load_params("digits", ["eval.teacher_steps=6", "eval.batch_size=50"])
    out = run_matrix(params, {"teacher-6": "teacher:steps=6", "teacher-2": "teacher:steps=2"}, tmp_path,
                     samples_per_prompt=2, save_images=False)
    t6, t2 = out["variants"]["teacher-6"]["digits"]["mean"], out["variants"]["teacher-2"]["digits"]["mean"]
    assert set(t6) == {"fd_real", "fd_teacher", "judge_accuracy", "judge_accuracy_min", "class_coverage", "diversity"}
    assert t6["judge_accuracy"] >= 0.8 and t6["class_coverage"] >= 0.8
    # the reference is the same sampler on other seeds: teacher-6 sits nearer to it than teacher-2
    assert t6["fd_teacher"] < t2["fd_teacher"]
    assert len(out["variants"]["teacher-6"]["digits"]["per_class"]) == 10
    assert out["held_out_rewards"] == ["digits_judge"] and out["training_rewards"] == ["digits_logprob"]
    assert (tmp_path / "digits_grid.png").is_file()
    assert (tmp_path / "teacher-2" / "grid_digits_by_class.png").is_file()
    table = (tmp_path / "table.md").read_text()
    assert "digits metrics (held-out judge)" in table
    meta = json.loads((tmp_path / "teacher-6" / "metadata.json").read_text())
    assert meta["digits"]["mean"]["judge_accuracy"] == t6["judge_accuracy"]
