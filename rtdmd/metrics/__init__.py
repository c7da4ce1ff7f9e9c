"""Metrics shared by training and evaluation (``toy2d``: SWD, MMD, coverage, tilted targets)."""
