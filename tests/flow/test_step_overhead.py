"""What a training step of the flow spends around its workers (bench/orchestration.py): workers end
without the interpreter's teardown, and the toy2d card's imports overlap training."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from rtdmd.pipeline.context import repo_root


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=str(repo_root()), timeout=300)


def test_exit_process_flushes_runs_atexit_handlers_and_keeps_the_exit_code():
    res = _python("""
        import atexit
        from rtdmd.dist import exit_process
        atexit.register(lambda: print("handler ran", flush=False))
        print("unflushed", end="")
        exit_process(3)
    """)
    assert res.returncode == 3
    assert res.stdout == "unflushedhandler ran\n"


def test_train_and_eval_entry_points_skip_the_interpreter_teardown():
    """``python -m rtdmd.train`` / ``rtdmd.eval`` keep their exit status and one-line user errors,
    and end before module globals are finalized (an object's ``__del__`` in ``__main__`` never runs)."""
    for module in ("rtdmd.train", "rtdmd.eval"):
        argv = ["cold_start", "--config", "/nonexistent/params.yaml"] if module == "rtdmd.train" else \
            ["--config", "/nonexistent/params.yaml", "--variant", "teacher", "--out", "/nonexistent/out"]
        res = _python(f"""
            import runpy, sys
            class Finalized:
                def __del__(self):
                    print("finalized", flush=True)
            keep = Finalized()
            sys.argv = [{module!r}] + {argv!r}
            runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
        """)
        assert res.returncode == 2, (module, res.stderr)
        assert "params file not found" in res.stderr and "Traceback" not in res.stderr
        assert "finalized" not in res.stdout, module


def test_warm_imports_loads_the_toy2d_card_modules_in_a_daemon_thread():
    """In a fresh process (importing the cards module loads no torch): toy2d starts a daemon thread
    that leaves torch and the sampler imported; other backbones start nothing."""
    res = _python("""
        import sys
        from types import SimpleNamespace
        from rtdmd.pipeline.cards import warm_imports
        assert "torch" not in sys.modules
        assert warm_imports(SimpleNamespace(params={"model": {"family": "flux2_klein"}})) is None
        assert "torch" not in sys.modules
        thread = warm_imports(SimpleNamespace(params={"model": {"family": "toy2d"}}))
        assert thread.daemon
        thread.join(timeout=120)
        assert not thread.is_alive()
        missing = {"torch", "rtdmd.eval.variants", "rtdmd.eval.report", "rtdmd.sampling"} - set(sys.modules)
        print("missing", sorted(missing))
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "missing []"


def test_run_training_calls_while_training_after_the_mlflow_run_and_before_the_launch(monkeypatch):
    from rtdmd.pipeline import training
    from rtdmd.pipeline.plan import plan_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("RTDMD_ARTIFACT_ROOT", "s3://b/a")
    ctx = plan_run(flow="RtdmdFlow", run_id="1", origin_run_id=None, overrides="", stages="all", cold_start_uri="",
                   rl_uri="", pathspec="RtdmdFlow/1/start/1", skip_services=True, backbone="toy2d",
                   deploy={"profile": "kubernetes", "backbone": "toy2d"})
    order = []

    class _Tr:
        def stage_run(self, *a, **k):
            order.append("mlflow run")
            return "run"

        def __getattr__(self, name):
            return lambda *a, **k: "run"

    monkeypatch.setattr(type(ctx), "tracker", lambda self: _Tr())
    monkeypatch.setattr(training.L, "run_stage", lambda *a, **k: order.append("launch"))
    monkeypatch.setattr(training, "verify_artifact", lambda uri: {"steps": 1})
    monkeypatch.setattr(training, "_log_stage_files", lambda *a, **k: None)
    training.run_training(ctx, "cold_start", init_uri=None, prep=None, pathspec="p",
                          while_training=lambda: order.append("while training"))
    assert order == ["mlflow run", "while training", "launch"]
    order.clear()  # other nodes: no MLflow run, no card work
    training.run_training(ctx, "cold_start", init_uri=None, prep=None, pathspec="p", node_index=1, num_nodes=2,
                          while_training=lambda: order.append("while training"))
    assert order == ["launch"]
