"""Progress bars of the training, rollout and evaluation loops (tqdm, global rank 0 only).

A bar shows the step count out of the total, the rate (``it/s`` or ``s/it``) and the ETA; it
writes to ``stderr``, so under the flow it lands in the stage's log. Other ranks get a disabled
bar (``update`` is a no-op), so no call site branches on the rank.

On a terminal the bar redraws in place; on a pipe or a log file (a flow step, a pod) every redraw
is written as its own line, at most one per ``$RTDMD_PROGRESS_INTERVAL`` seconds (default 30),
plus the first and the final line (the final one carries the mean rate); a transient bar
(``leave=False``) appears in a log only when it runs longer than that interval.

``$RTDMD_PROGRESS``: ``on`` (default) or ``off`` (also ``1``/``0``, ``true``/``false``); any other
value is refused with :class:`ProgressConfigError`.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Mapping

ENV, ENV_INTERVAL = "RTDMD_PROGRESS", "RTDMD_PROGRESS_INTERVAL"
_VALUES = {"on": True, "1": True, "true": True, "off": False, "0": False, "false": False}
LOG_INTERVAL_S = 30.0
# metrics shown next to the training bar when a stage logs them (the headline losses / rewards)
POSTFIX_KEYS = ("generator/dmd", "fake/ac", "reward/mean", "dm/loss", "ppo/kl")
_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ProgressConfigError(ValueError):
    """``$RTDMD_PROGRESS`` / ``$RTDMD_PROGRESS_INTERVAL`` has a value that is not understood."""


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether progress bars are wanted (``$RTDMD_PROGRESS``, see the module docstring)."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV, "on")
    value = _VALUES.get(raw.strip().lower())
    if value is None:
        raise ProgressConfigError(f"${ENV}={raw!r} is not understood: expected on or off (or 1/0, true/false)")
    return value


def log_interval(environ: Mapping[str, str] | None = None) -> float:
    """Seconds between two progress lines in a log (``$RTDMD_PROGRESS_INTERVAL``, > 0)."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_INTERVAL)
    if raw is None:
        return LOG_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ProgressConfigError(f"${ENV_INTERVAL}={raw!r} is not understood: expected a number of seconds > 0")
    return value


def check_environment() -> None:
    """Refuse a bad ``$RTDMD_PROGRESS*`` value up front (entry points call it before any work)."""
    enabled()
    log_interval()


class _Lines:
    """File-like for tqdm on a pipe or log file: every redraw becomes one plain line (no ``\\r``,
    no cursor movement); blank redraws (a cleared bar) are dropped."""

    def write(self, text: str) -> int:
        out = sys.stderr
        for line in _ESCAPE.sub("", text).replace("\r", "\n").split("\n"):
            if line.strip():
                out.write(line.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


def progress(total: int | None, desc: str, *, rank: int = 0, initial: int = 0, unit: str = "it",
             leave: bool = True):
    """A tqdm bar on global rank 0 (when :func:`enabled`), a disabled one elsewhere."""
    from tqdm import tqdm

    if rank != 0 or not enabled():
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, file=sys.stderr,
                    dynamic_ncols=True, mininterval=0.5)
    every = log_interval()
    # a transient bar (``leave=False``: a rollout inside a training step) shows up in a log only
    # when it outlasts one interval
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, file=_Lines(), ascii=True,
                ncols=100, mininterval=every, delay=0 if leave else every)


def postfix(metrics: Mapping[str, Any], keys: tuple[str, ...] = POSTFIX_KEYS) -> dict[str, str]:
    """The headline metrics of a logging step, formatted for ``tqdm.set_postfix``."""
    return {k: f"{float(metrics[k]):.4g}" for k in keys if k in metrics}
