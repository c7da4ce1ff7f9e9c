"""Exceptions raised by the reward scorers.

Every error names what was expected, so a caller can fix its input without
reading the scorer's source.
"""

from __future__ import annotations

__all__ = [
    "RewardError",
    "RewardInputError",
    "RewardNotDifferentiableError",
    "UnknownRewardError",
    "RewardCheckpointError",
    "MissingCheckpointError",
    "CorruptCheckpointError",
    "MissingBackendError",
    "RewardRoutingError",
]


class RewardError(Exception):
    """Base class of every reward error."""


class RewardInputError(RewardError, ValueError):
    """Images, prompts or metadata do not have the expected type, shape or range."""


class RewardNotDifferentiableError(RewardError, RuntimeError):
    """``score_differentiable`` was called on a scorer without a gradient path."""


class UnknownRewardError(RewardError, KeyError, ValueError):
    """A reward name (or backend name) that is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class RewardCheckpointError(RewardError):
    """Base class of checkpoint problems."""


class MissingCheckpointError(RewardCheckpointError, FileNotFoundError):
    """A checkpoint file or directory is missing (the message says where to put it)."""


class CorruptCheckpointError(RewardCheckpointError, RuntimeError):
    """A checkpoint file exists but cannot be read (truncated, wrong format, wrong keys)."""


class MissingBackendError(RewardError, ImportError):
    """An optional backend package is not installed (the message names the pip extra)."""


class RewardRoutingError(RewardError, ValueError):
    """A reward is routed to a dataset that is not available."""
