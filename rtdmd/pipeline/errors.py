"""Errors of the pipeline layer. They derive from Metaflow's ``MetaflowException`` when Metaflow is
installed, so a failing step prints one clear headline + message instead of an "Internal error"
traceback; without Metaflow they are plain exceptions."""
from __future__ import annotations

try:
    from metaflow.exception import MetaflowException as _Base
except ImportError:  # pragma: no cover - the pipeline extra is not installed
    class _Base(Exception):  # type: ignore[no-redef]
        headline = "error"

        def __init__(self, msg: str = ""):
            super().__init__(msg)
            self.message = msg


class PipelineError(_Base):
    headline = "RTDMD pipeline error"

    def __init__(self, msg: str = ""):
        super().__init__(msg)
        self.message = msg
        self.args = (msg,)

    def __str__(self) -> str:
        return self.message
