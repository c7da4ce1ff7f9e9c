"""Reward scorers: nine image rewards behind one interface, a weighted multi-scorer and a registry.

>>> from rtdmd.rewards import get_scorer, list_scorers, MultiScorer
>>> s = get_scorer("clipscore", ckpt_dir="/path/to/reward_ckpts")      # doctest: +SKIP
>>> s(images, prompts)                # 1-D float32 tensor, one score per (image, prompt)   # doctest: +SKIP
>>> MultiScorer({"pickscore": 1.0, "hpsv2": 1.0})(images, prompts)   # {name: ..., "mean": weighted sum}  # doctest: +SKIP

``list_scorers()`` returns ``{name: ScorerInfo}`` (``.differentiable``,
``.domain``, ``.backends``, ``.default_backend``). Checkpoint layout and
resolution: :mod:`rtdmd.rewards.ckpt`. Tiny test checkpoints:
:func:`rtdmd.rewards.tiny.build_tiny_reward_checkpoints`.
"""

from __future__ import annotations

from . import builtin  # noqa: F401  (registers the nine rewards)
from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, FunctionScorer, ImageBatch, RewardScorer, ScorerInfo
from .errors import (CorruptCheckpointError, MissingBackendError, MissingCheckpointError, RewardCheckpointError,
                     RewardError, RewardInputError, RewardNotDifferentiableError, RewardRoutingError,
                     UnknownRewardError)
from .multi import DEFAULT_REWARD_DATASETS, MultiScorer, clear_scorer_cache, route_rewards, shared_scorer
from .registry import differentiable_scorers, get_scorer, list_scorers, register_scorer, scorer_info

__all__ = [
    "get_scorer", "list_scorers", "register_scorer", "differentiable_scorers", "scorer_info",
    "MultiScorer", "shared_scorer", "clear_scorer_cache", "route_rewards", "DEFAULT_REWARD_DATASETS",
    "RewardScorer", "FunctionScorer", "ImageBatch", "ScorerInfo", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD",
    "RewardError", "RewardInputError", "RewardNotDifferentiableError", "UnknownRewardError",
    "RewardCheckpointError", "MissingCheckpointError", "CorruptCheckpointError", "MissingBackendError",
    "RewardRoutingError",
]
