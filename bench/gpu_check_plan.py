"""Adapter from the GPU check to the real-scale memory planner (``rtdmd plan``).

:func:`planned_peak` asks the planner for the peak memory per GPU of one stage job's exact
configuration (the same params name and overrides, the same world size) so the check can report
measured ÷ planned. The planner is a separate piece of work: when this checkout's ``rtdmd`` CLI has
no ``plan`` command, the result is ``{"status": "planner not available", ...}`` and the report
shows the measured peaks without a ratio — nothing is estimated in its place.

Contract assumed (the planner's documented command line): ``rtdmd plan --backbone NAME --stage
STAGE --nodes 1 --gpus-per-node W --json [--set key=value ...]`` prints one JSON object; its peak is read
from the first of :data:`PEAK_KEYS` found (GiB, or bytes when the key says so). Anything else is
reported verbatim (``status: "planner output not understood"``), never guessed. A configuration the
planner refuses with its one-line error (exit 2: today it simulates the five real backbones'
cold start only) is ``status: "not plannable"`` with that line.
"""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Sequence

PEAK_KEYS = ("peak_gib", "peak_gb", "total_gib", "total_gb", "peak_bytes")


def planner_available() -> bool:
    try:
        from rtdmd.cli import build_parser

        sub = next(a for a in build_parser()._actions if a.dest == "command")
        return "plan" in sub.choices
    except Exception:
        return False


def _find_peak(obj: Any) -> float | None:
    if isinstance(obj, dict):
        for k in PEAK_KEYS:
            v = obj.get(k)
            if isinstance(v, (int, float)):
                return float(v) / 2**30 if k.endswith("bytes") else float(v)
        for v in obj.values():
            found = _find_peak(v)
            if found is not None:
                return found
    return None


def planned_peak(config: str, overrides: Sequence[str], stage: str, world: int, *, env: dict | None = None,
                 timeout: float = 120.0) -> dict[str, Any]:
    """``{"status": "ok", "peak_gib": x}`` from the planner, or a status saying why there is none."""
    if not planner_available():
        return {"status": "planner not available",
                "detail": "this checkout's rtdmd CLI has no `plan` command; measured peaks only"}
    cmd = [sys.executable, "-m", "rtdmd.cli", "plan", "--backbone", config, "--stage", stage, "--nodes", "1",
           "--gpus-per-node", str(world), "--json", *(a for o in overrides for a in ("--set", o))]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "planner failed", "detail": f"no answer in {timeout:.0f} s"}
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["(no message)"])[-1]
        if res.returncode == 2:  # a clear refusal: the planner cannot simulate this configuration (yet)
            return {"status": "not plannable", "detail": tail[:300]}
        return {"status": "planner failed", "detail": f"rc={res.returncode}: {tail[:300]}"}
    lines = [ln for ln in res.stdout.splitlines() if ln.strip().startswith("{")]
    try:
        obj = json.loads(lines[-1] if lines else res.stdout)
    except json.JSONDecodeError:
        return {"status": "planner output not understood", "detail": res.stdout[-300:]}
    peak = _find_peak(obj)
    if peak is None:
        return {"status": "planner output not understood", "detail": json.dumps(obj)[:300]}
    return {"status": "ok", "peak_gib": peak}
