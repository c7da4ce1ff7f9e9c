"""Never lose a run: exclusive ``--out``, preemption-safe stop, metric rows that match the resume point.

Preemption (SIGTERM — what Kubernetes and torchrun send before killing a worker — or SIGINT):

* the handler only records the signal; the training loop asks :meth:`PreemptionGuard.stop_requested`
  after every finished step, which all-reduces the flag, so every rank stops after the *same*
  step even if only one rank was signalled;
* the trainer then writes a complete checkpoint of that step (skipped if it just wrote one) and
  raises :class:`Preempted`; the CLI exits with :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``:
  "try again"); re-running the same command resumes at that step, so no finished step is lost;
* a watchdog bounds the whole stop: if the process is still alive ``grace_s`` seconds after the
  signal (a step or save longer than the grace period), it exits with :data:`EXIT_GRACE_EXCEEDED`
  (76). Checkpoints are published atomically, so the previous complete one is then the resume
  point. Set ``grace_s`` a few seconds below the orchestrator's grace period (Kubernetes'
  ``terminationGracePeriodSeconds`` defaults to 30 s, torchrun waits 30 s for its workers);
* a second signal during the stop exits at once with ``128 + signum``.

Exclusive output (:func:`exclusive_out`): global rank 0 takes the ``rtdmd.artifacts.lock`` lock
of ``--out`` and broadcasts the outcome, so every rank of a second run on the same output fails
at once with the owner's description (exit 2), before any model is built.

Metric rows (:func:`trim_metrics`): after resuming at step ``S`` the rows a killed run logged
after ``S`` are dropped from ``metrics.jsonl`` (all rows when starting from step 0, whose
step-0 evaluation is logged again), so a re-run never leaves two rows for one step.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from rtdmd.artifacts.lock import OutputLock, OutputLockedError, check_dir_target
from rtdmd.artifacts.store import is_s3
from rtdmd import dist as D

EXIT_PREEMPTED = 75
EXIT_GRACE_EXCEEDED = 76
DEFAULT_GRACE_S = 25.0
MAX_GRACE_S = 3600.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on a signal after ``step``; a checkpoint of that step was written."""

    def __init__(self, step: int, signum: int, seconds: float):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint step-{step} "
                         f"written {seconds:.1f}s after the signal; re-run the same command to resume")
        self.step, self.signum, self.seconds = step, signum, seconds


class PreemptionGuard:
    """Signal flag + grace watchdog; ``with PreemptionGuard(25):`` installs it (main thread only)."""

    def __init__(self, grace_s: float = DEFAULT_GRACE_S, log: Callable[[str], None] | None = None):
        if not 0 < grace_s <= MAX_GRACE_S:
            raise ValueError(f"--preempt-grace-s {grace_s}: expected a number of seconds in (0, {MAX_GRACE_S:g}]")
        self.grace_s = float(grace_s)
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.signum: int | None = None
        self.t_signal: float | None = None
        self._previous: dict[int, object] = {}
        self._done = threading.Event()

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()  # stopped in time: cancel the watchdog
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum, self.t_signal = signum, time.monotonic()
        threading.Thread(target=self._watchdog, daemon=True).start()

    def _watchdog(self) -> None:
        if self._done.wait(self.grace_s):
            return
        self.log(f"error: still running {self.grace_s:g}s after {signal.Signals(self.signum).name} "
                 "(--preempt-grace-s); exiting; the previous complete checkpoint is the resume point")
        os._exit(EXIT_GRACE_EXCEEDED)

    def stop_requested(self) -> bool:
        """True on every rank when any rank was signalled (a collective: call it on all ranks)."""
        flag = torch.tensor([0.0 if self.signum is None else float(self.signum)])
        flag = D.all_reduce_max(flag)
        if flag[0] > 0 and self.signum is None:  # another rank got it: stop here too
            self.signum, self.t_signal = int(flag[0]), time.monotonic()
            threading.Thread(target=self._watchdog, daemon=True).start()
        return bool(flag[0] > 0)

    def elapsed(self) -> float:
        return 0.0 if self.t_signal is None else time.monotonic() - self.t_signal


class NoGuard:
    """Default for trainers run in-process (tests, notebooks): never asks to stop."""

    signum = None

    def stop_requested(self) -> bool:
        return False


@contextlib.contextmanager
def exclusive_out(out: str, env: D.DistEnv, command: str) -> Iterator[None]:
    """Rank 0 locks ``out`` (local paths); every rank raises the same error when it is taken."""
    lock, error = None, ""
    if env.is_main and not is_s3(out):
        try:
            check_dir_target(out)
            lock = OutputLock(out, command=command).acquire()
        except (OutputLockedError, OSError, RuntimeError) as exc:
            error = str(exc)
    error = D.broadcast_object(error)
    if error:
        raise OutputLockedError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def trim_metrics(logger, step: int) -> int:
    """Drop rows with ``step > step`` (all rows when ``step == 0``) from JSONL loggers; returns the count."""
    dropped = 0
    for lg in getattr(logger, "loggers", [logger]):
        path = getattr(lg, "path", None)
        if path is None or not Path(path).is_file():
            continue
        with open(path, "r+", encoding="utf-8") as f:
            lines = f.read().splitlines()
            keep = [ln for ln in lines if ln.strip() and step > 0 and _row_step(ln) <= step]
            dropped += len(lines) - len(keep)
            if dropped:
                f.seek(0)
                f.write("".join(ln + "\n" for ln in keep))
                f.truncate()
    return dropped


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", float("inf")))
    except (ValueError, AttributeError):
        return float("inf")  # a torn last line from a kill: dropped
