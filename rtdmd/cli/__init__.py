"""Command lines: ``rtdmd`` (:mod:`rtdmd.cli.main`), ``python -m rtdmd.infer`` (:mod:`rtdmd.cli.infer`)
and ``python -m rtdmd.eval`` (:mod:`rtdmd.cli.eval`), sharing one preamble (:mod:`rtdmd.cli.common`).
``python -m rtdmd.train`` stays with the trainer (``rtdmd/train/__main__.py``)."""
from rtdmd.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
