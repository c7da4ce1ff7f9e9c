"""Run ``python -m rtdmd.train ...`` / ``python -m rtdmd.eval ...`` under torchrun from a flow step.

* **a ``@torchrun`` step** (the kubernetes profile's training steps, one node or several):
  ``current.torch.run`` from metaflow-torchrun, which adds ``--nnodes/--node_rank/--master_addr/
  --rdzv_endpoint`` from the step's ``@parallel`` gang and fails the other nodes when one fails.
  ``nproc_per_node`` is always passed (its default is 1).
* **otherwise** (the local profile's plain ``@parallel`` steps, evaluation, no Metaflow):
  ``torchrun --standalone --nproc_per_node N --module <module> <args>`` — N = visible GPUs (NCCL)
  or, without GPUs, ``compute.local_nproc`` CPU processes (gloo). The trainer picks the backend
  itself (``distributed.backend: auto``). With N = 1 (e.g. CPU evaluation) the module runs as a
  plain ``python -m`` process: no torchrun agent to start, no process group.

Both paths stream the workers' output line by line to the step's stdout/stderr (Metaflow keeps
it as the task log) and keep the last lines; when torchrun exits non-zero, :class:`StageFailed`
is raised with the failing rank's own error (the exception line of its traceback, the signal
that killed it, or its ``error:`` line) instead of torchrun's generic ``ChildFailedError``.
"""
from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

from rtdmd.pipeline.errors import PipelineError

TAIL_LINES = 600


class StageFailed(PipelineError):
    """A torchrun-launched stage failed; the message carries the worker's error."""

    headline = "RTDMD stage failed"

    def __init__(self, message: str, *, returncode: int, rank: int | None = None, detail: str = ""):
        super().__init__(message)
        self.returncode = returncode
        self.rank = rank
        self.detail = detail


# ----------------------------------------------------------------------------- devices
def visible_gpus() -> int:
    """Number of NVIDIA GPUs this process may use (no torch import: flow steps stay light)."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids = [d for d in cvd.split(",") if d.strip() and d.strip() != "-1"]
        if not ids:
            return 0
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    if cvd is not None:
        n = min(n, len([d for d in cvd.split(",") if d.strip()]))
    return n


def local_nproc(local_cpu_procs: int, gpus: int | None = None) -> tuple[int, str]:
    """``(nproc_per_node, backend)`` on this machine: one process per GPU (nccl) or CPU/gloo."""
    gpus = visible_gpus() if gpus is None else gpus
    if gpus > 0:
        return gpus, "nccl"
    return max(1, int(local_cpu_procs)), "gloo"


# ----------------------------------------------------------------------------- commands
def torchrun_command(module: str, args: Sequence[str], nproc_per_node: int, *, python: str | None = None,
                     max_restarts: int = 0) -> list[str]:
    """Single-node torchrun command line (``--standalone`` picks a free rendezvous port)."""
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nnodes", "1", "--nproc_per_node", str(int(nproc_per_node)),
            "--max_restarts", str(int(max_restarts)), "--module", module, *map(str, args)]


# ----------------------------------------------------------------------------- failure summary
_ROOT = re.compile(r"Root Cause \(first observed failure\):")
_FIELD = re.compile(r"^\s*(rank|exitcode|error_file|traceback)\s*:\s*(.*)$")
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning|Failure)|[A-Za-z_]\w*(\.[A-Za-z_]\w*)+)(:\s|:?$)")
_ERROR_LINE = re.compile(r"(^|: )error: ", re.IGNORECASE)
_RANK_LINE = re.compile(r"^\[(?:rank|default)(\d+)\]:\s?(.*)$")


@dataclass
class FailureSummary:
    rank: int | None
    exitcode: int | None
    message: str
    traceback: list[str]


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except (ValueError, TypeError):
        return f"signal {-code}"


def summarize_failure(lines: Sequence[str], returncode: int) -> FailureSummary:
    """The failing worker's error from torchrun's output (pure; see the module docstring)."""
    lines = [ln.rstrip("\n") for ln in lines]
    rank = exitcode = None
    error_file = tb_field = ""
    for i in range(len(lines) - 1, -1, -1):
        if _ROOT.search(lines[i]):
            for ln in lines[i + 1: i + 12]:
                m = _FIELD.match(ln)
                if not m:
                    continue
                key, val = m.group(1), m.group(2).strip()
                if key == "rank":
                    rank = int(re.match(r"-?\d+", val).group()) if re.match(r"-?\d+", val) else None
                elif key == "exitcode":
                    mm = re.match(r"-?\d+", val)
                    exitcode = int(mm.group()) if mm else None
                elif key == "error_file":
                    error_file = val
                elif key == "traceback":
                    tb_field = val
            break

    # 1. the elastic error file (workers whose main is wrapped with @record)
    if error_file and error_file != "<N/A>" and os.path.isfile(error_file):
        try:
            import json

            data = json.loads(open(error_file, encoding="utf-8").read())
            msg = data.get("message", {})
            text = msg.get("message") if isinstance(msg, dict) else str(msg)
            stack = (msg.get("extraInfo", {}) or {}).get("py_callstack", "") if isinstance(msg, dict) else ""
            if text:
                return FailureSummary(rank, exitcode, text.strip().splitlines()[-1], stack.splitlines()[-30:])
        except (OSError, ValueError):
            pass

    # 2. the failing rank's own prefixed traceback ("[rank1]: ValueError: ...")
    if rank is not None:
        own = [m.group(2) for ln in lines if (m := _RANK_LINE.match(ln)) and int(m.group(1)) == rank]
        own = [ln for ln in own if ln.strip()]
        if own:
            return FailureSummary(rank, exitcode, own[-1].strip(), own[-30:])

    # 3. killed by a signal
    if exitcode is not None and exitcode < 0:
        return FailureSummary(rank, exitcode, f"rank {rank} was killed by {_signal_name(exitcode)}"
                              + (f" ({tb_field})" if tb_field else ""), [])

    # 4. the last traceback that is not torchrun's own ChildFailedError, or an "error:" line
    texts = [(m.group(2) if (m := _RANK_LINE.match(ln)) else ln) for ln in lines]
    blocks: list[list[str]] = []
    for idx, text in enumerate(texts):
        if text.strip().startswith("Traceback (most recent call last):"):
            for j in range(idx + 1, min(len(texts), idx + 400)):
                if _EXC_LINE.match(texts[j].strip()):
                    blocks.append([t for t in texts[idx: j + 1]])
                    break
    for block in reversed(blocks):
        last = block[-1].strip()
        if "ChildFailedError" in last:
            continue
        return FailureSummary(rank, exitcode, last, block[-30:])
    for ln in reversed(lines):
        m = _RANK_LINE.match(ln)
        text = (m.group(2) if m else ln).strip()
        if _ERROR_LINE.search(text):
            return FailureSummary(rank, exitcode, text, [])
    return FailureSummary(rank, exitcode, f"torchrun exited with code {returncode}"
                          + (f" (rank {rank}, exit code {exitcode})" if rank is not None else ""), [])


def _failure(stage: str, lines: Sequence[str], returncode: int) -> StageFailed:
    s = summarize_failure(lines, returncode)
    where = f"rank {s.rank}" if s.rank is not None else "a worker"
    code = f", exit code {s.exitcode}" if s.exitcode is not None else ""
    detail = "\n".join(s.traceback)
    msg = f"stage '{stage}' failed on {where}{code}: {s.message}"
    if detail and s.message not in ("",):
        msg += "\n--- worker traceback (last lines) ---\n" + detail
    return StageFailed(msg, returncode=returncode, rank=s.rank, detail=detail)


# ----------------------------------------------------------------------------- streaming
class _Tee:
    """File-like that forwards to ``target`` and records complete lines in ``tail``."""

    def __init__(self, target, tail: collections.deque, lock: threading.Lock):
        self.target, self.tail, self.lock, self._buf = target, tail, lock, ""

    def write(self, text: str) -> int:
        self.target.write(text)
        with self.lock:
            self._buf += text
            *done, self._buf = self._buf.split("\n")
            self.tail.extend(done)
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def __getattr__(self, name):
        return getattr(self.target, name)


@contextmanager
def capture_std(tail: collections.deque) -> Iterator[None]:
    """Tee ``sys.stdout``/``sys.stderr`` into ``tail`` (used around ``current.torch.run``)."""
    lock = threading.Lock()
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(old_out, tail, lock), _Tee(old_err, tail, lock)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = old_out, old_err


def _pump(stream, target, tail: collections.deque, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        text = raw.decode("utf-8", errors="replace")
        with lock:
            tail.append(text.rstrip("\n"))
        try:
            target.write(text)
            target.flush()
        except (OSError, ValueError):
            pass
    stream.close()


def run_streamed(cmd: Sequence[str], *, stage: str, env: Mapping[str, str] | None = None,
                 cwd: str | None = None, timeout: float | None = None) -> None:
    """Run ``cmd``, stream its stdout/stderr, raise :class:`StageFailed` with the worker's error."""
    tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
    lock = threading.Lock()
    print(f"[rtdmd] {stage}: {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(env) if env is not None else None, cwd=cwd)
    threads = [threading.Thread(target=_pump, args=(proc.stdout, sys.stdout, tail, lock), daemon=True),
               threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, tail, lock), daemon=True)]
    for t in threads:
        t.start()
    try:
        rc = proc.wait(timeout=timeout)
    except BaseException:
        # step interrupted (KeyboardInterrupt, timeout, Metaflow termination): stop torchrun,
        # which forwards SIGTERM to its workers; then make sure nothing is left behind
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        for t in threads:
            t.join(timeout=10)
    if rc != 0:
        raise _failure(stage, list(tail), rc)


def run_stage(module: str, args: Sequence[str], *, stage: str, nproc_per_node: int,
              env: Mapping[str, str] | None = None, torch_run: bool | None = None,
              timeout: float | None = None, cwd: str | None = None) -> None:
    """Launch ``python -m <module> <args>`` on every rank of this step.

    ``torch_run`` defaults to "this step has ``@torchrun``" (:func:`torchrun_step`); then
    ``current.torch.run`` launches the workers (it knows the gang's nodes), else a single-node
    torchrun of our own. Either way a failure raises :class:`StageFailed` with the worker's error.
    """
    env = dict(os.environ if env is None else env)
    if torch_run is None:
        torch_run = torchrun_step()
    if not torch_run:
        if int(nproc_per_node) == 1:  # one process: no torchrun agent (same code path, no process group)
            cmd = [sys.executable, "-m", module, *map(str, args)]
        else:
            cmd = torchrun_command(module, args, nproc_per_node)
        run_streamed(cmd, stage=stage, env=env, timeout=timeout, cwd=cwd)
        return
    if not torchrun_step():
        raise PipelineError(f"stage '{stage}': torch_run=True needs a @torchrun step (metaflow-torchrun's "
                            "current.torch is not set here)")
    from metaflow import current

    tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
    saved, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update(env)  # current.torch.run's child inherits this process's environment (and cwd)
    if cwd:
        os.chdir(cwd)
    print(f"[rtdmd] {stage}: current.torch.run(--module {module} ...), nproc_per_node {int(nproc_per_node)}", flush=True)
    try:
        with capture_std(tail):
            current.torch.run(entrypoint="--module", entrypoint_args=[module, *map(str, args)],
                              nproc_per_node=int(nproc_per_node))
    except Exception as exc:  # TorchrunException carries only "... return code N"
        m = re.search(r"return code (-?\d+)", str(exc))
        rc = getattr(exc, "returncode", None) or (int(m.group(1)) if m else 1)
        raise _failure(stage, list(tail), rc) from exc
    finally:
        os.environ.clear()
        os.environ.update(saved)
        os.chdir(saved_cwd)


def torchrun_step() -> bool:
    """Is this a Metaflow step decorated with ``@torchrun`` (``current.torch`` is its executor)?"""
    try:
        from metaflow import current
    except ImportError:  # pragma: no cover - the trainer runs without Metaflow
        return False
    try:
        return callable(getattr(getattr(current, "torch", None), "run", None)) and int(current.parallel.num_nodes) >= 1
    except Exception:
        return False
