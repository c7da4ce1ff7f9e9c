"""RTDMD: AC-DMD distillation and reward-tilted RL for few-step flow-matching generators.

Layers (nothing imports upward): algorithms (pure tensor math) <- backbones, lora, rewards,
data <- train / eval <- pipeline <- flows. See README "Architecture".
"""
__version__ = "0.1.0"
