"""Shared helpers of the benchmark items: timing statistics, machine facts, child processes,
sized tiny models, fitted exponents.

Every item module exposes ``run(quick: bool, workdir: Path) -> dict`` returning a JSON-able
result with at least ``title``, ``metric`` (name), ``value``, ``target`` (text), ``met``
(True/False/None), ``threads`` and ``table`` (a list of row dicts), and ``notes``.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------- statistics
def med(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def stats(xs: Sequence[float]) -> dict[str, float]:
    """``{median, min, n}`` of a list of seconds (or any numbers)."""
    xs = [float(x) for x in xs]
    return {"median": med(xs), "min": min(xs) if xs else float("nan"), "n": len(xs)}


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log(y) on log(x): ``y ∝ x^a`` → ``a``."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


# ---------------------------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    model, isa = "unknown", "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and isa == "unknown":
                flags = set(line.split(":", 1)[1].split())
                isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    import torch

    return {"nproc": os.cpu_count(), "cpu_model": model, "isa": isa, "loadavg": [round(x, 2) for x in load],
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def set_threads(n: int) -> int:
    import torch

    torch.set_num_threads(int(n))
    return torch.get_num_threads()


def matmul_gflops(n: int = 1024, repeats: int = 5) -> list[float]:
    """Dense fp32 ``n×n @ n×n`` throughput samples (GFLOP/s) at the current thread count."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    out = []
    for _ in range(repeats):
        dt = timed(lambda: a @ b)
        out.append(2.0 * n ** 3 / dt / 1e9)
    return out


# ---------------------------------------------------------------------------------- child processes
def child_env(threads: int = 1, rss: bool = False, **extra: Any) -> dict[str, str]:
    """Environment of a benchmark child: explicit thread counts, offline hubs, venv on PATH;
    ``rss=True`` adds ``MALLOC_MMAP_THRESHOLD_=65536`` (freed memory goes back to the OS, so the
    peak RSS reflects live tensors rather than glibc arena fragmentation)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
                "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"})
    if rss:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_json(cmd: Sequence[str], *, env: dict[str, str], timeout: float, cwd: Path = ROOT) -> dict:
    """Run a child that prints one JSON object on its last stdout line; returns it (raises with the
    child's stderr tail on failure)."""
    res = subprocess.run(list(cmd), cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in res.stdout.splitlines() if ln.strip().startswith("{")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(map(str, cmd[:6]))}... failed (rc={res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------- models
def sized_tiny_flux2(workdir: Path, *, heads: int = 2, head_dim: int = 16, double: int = 1, single: int = 1) -> Path:
    """A tiny FLUX.2-klein pipeline whose transformer has the given width/depth (built once,
    cached under ``workdir/models``) — through the tiny builder's ``transformer_overrides``."""
    from rtdmd.backbones.tiny import ensure_tiny

    q = head_dim // 4
    rope = (q, q, q, head_dim - 3 * q)
    tag = f"flux2_h{heads}x{head_dim}_d{double}_s{single}"
    return ensure_tiny("flux2", workdir / "models" / tag, transformer_overrides={
        "num_attention_heads": heads, "attention_head_dim": head_dim, "num_layers": double,
        "num_single_layers": single, "axes_dims_rope": rope})


def tiny_params(name: str, overrides: Sequence[str] = ()):
    from rtdmd.config import load_params

    return load_params(name, ["distributed.strategy=none", *overrides])


def fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.{nd}g}"
        return f"{x:.{nd}f}".rstrip("0").rstrip(".") if "." in f"{x:.{nd}f}" else f"{x:.{nd}f}"
    return str(x)


def md_table(rows: list[dict[str, Any]], cols: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    if cols is None:
        cols = []
        for r in rows:
            cols += [k for k in r if k not in cols]
    cols = list(cols)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(out) + "\n"


def item_main(run: Callable[..., Any], argv=None, *, threads: bool = False) -> int:
    """CLI of one bench item: ``python -m bench.<item> [--quick] [--workdir DIR]`` prints its JSON
    (``threads``: the item also takes ``--threads N``, passed as ``run``'s third argument)."""
    import argparse
    import json
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", default=None)
    if threads:
        ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    wd = Path(a.workdir or tempfile.mkdtemp(prefix="bench-"))
    wd.mkdir(parents=True, exist_ok=True)  # a --workdir that does not exist yet is created
    print(json.dumps(run(a.quick, wd, a.threads) if threads else run(a.quick, wd), default=str))
    return 0
