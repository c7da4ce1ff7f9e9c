"""Errors of the model registry. All derive from :class:`RegistryError` (a ``RuntimeError``), so
the ``rtdmd`` CLI prints them as one line and exits non-zero."""
from __future__ import annotations


class RegistryError(RuntimeError):
    """Something about the registry, a model reference or a promotion is wrong; the message says what."""


class RegistryUnreachable(RegistryError):
    """The MLflow tracking/registry server cannot be reached (or the store cannot be used)."""


class ModelRefError(RegistryError):
    """A model reference (version, alias, run, artifact URI) does not resolve."""


class NoEvaluationError(RegistryError):
    """A version has no evaluation recorded, so it cannot be gated."""


class GateFailure(RegistryError):
    """Promotion refused: at least one gate failed. ``report`` holds every gate result."""

    def __init__(self, message: str, report):
        super().__init__(message)
        self.report = report


class LockTimeout(RegistryError):
    """Another promotion held the registry lock for longer than ``registry.lock_timeout_s``."""
