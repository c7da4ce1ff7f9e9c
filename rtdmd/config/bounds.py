"""Upper and lower bounds of numeric command-line options, checked before any work starts.

A typo such as ``--steps 100000000`` would otherwise run for days (or allocate a step list of
that length); ``nan``/``inf`` would turn into invalid JSON or NaN samples. Each option is checked
against a closed range; ``None`` means "not given" and passes.
"""
from __future__ import annotations

import math

from rtdmd.config.typed import ConfigError, shown

#: option -> (low, high), both inclusive. Steps: timesteps live in (0, 1000] (§3.1), so more than
#: 1000 sampling steps cannot be distinct.
BOUNDS: dict[str, tuple[float, float]] = {
    "steps": (1, 1000),
    "samples_per_prompt": (1, 10_000),
    "batch_size": (1, 4096),
    "num_prompts": (1, 1_000_000),
    "seed": (0, 2**63 - 1),
    "eta": (0.0, 1.0),
    "guidance": (0.0, 100.0),
    "max_steps": (1, 10**9),
    "alpha": (1e-6, 1e4),
}


def check_cli_numbers(**values) -> None:
    """Raise :class:`ConfigError` naming ``--option value`` and its range for the first bad one."""
    for name, value in values.items():
        if value is None:
            continue
        lo, hi = BOUNDS[name]
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{flag} {shown(value)}: expected a finite number in [{lo:g}, {hi:g}]")
        if not lo <= value <= hi:
            raise ConfigError(f"{flag} {shown(value)}: expected a number in [{lo:g}, {hi:g}]")
