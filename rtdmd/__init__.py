"""RTDMD: AC-DMD distillation and reward-tilted RL for few-step flow-matching generators.

Imports go downhill only through the layers listed in README "Architecture" (checked by
tests/test_layers.py).
"""
__version__ = "0.1.0"
