"""Reward registry: name -> factory + info.

``list_scorers()`` returns ``{name: ScorerInfo}``; ``ScorerInfo`` has
``.differentiable``, ``.domain``, ``.backends`` and ``.default_backend``.

A factory is any callable returning a scorer. It is called with the keyword
arguments it accepts among ``ckpt_dir``, ``device`` and ``backend``. If it
returns a plain function ``fn(inputs, prompts, metadata) -> tensor`` instead of
a :class:`~rtdmd.rewards.base.RewardScorer`, the function is wrapped in a
:class:`~rtdmd.rewards.base.FunctionScorer` carrying the registered
``differentiable``/``domain`` flags.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from typing import Any, Callable

from .base import FunctionScorer, RewardScorer, ScorerInfo
from .errors import UnknownRewardError

__all__ = ["register_scorer", "get_scorer", "list_scorers", "differentiable_scorers", "scorer_info"]


class _Entry:
    def __init__(self, info: ScorerInfo, factory: Callable | str):
        self.info = info
        self.factory = factory  # callable, or "module:attr" resolved lazily


_REGISTRY: dict[str, _Entry] = {}
_LOCK = threading.Lock()


def register_scorer(name: str, factory: Callable | str, *, differentiable: bool, domain: str = "image",
                    backends: tuple[str, ...] = (), default_backend: str | None = None,
                    description: str = "", overwrite: bool = False) -> None:
    """Register a reward. ``domain="points"`` skips image validation ([B,D] float tensors)."""
    if not isinstance(name, str) or not name:
        raise ValueError("reward name must be a non-empty string")
    with _LOCK:
        if name in _REGISTRY and not overwrite:
            old = _REGISTRY[name]
            if old.factory is factory:
                return
            raise ValueError(f"reward '{name}' is already registered (pass overwrite=True to replace it)")
        _REGISTRY[name] = _Entry(ScorerInfo(name, bool(differentiable), domain, tuple(backends),
                                            default_backend, description), factory)


def _ensure_builtin() -> None:
    # the built-in scorers are registered by rtdmd.rewards.builtin (imported by the package)
    importlib.import_module("rtdmd.rewards.builtin")


def list_scorers() -> dict[str, ScorerInfo]:
    _ensure_builtin()
    return {k: v.info for k, v in sorted(_REGISTRY.items())}


def differentiable_scorers() -> list[str]:
    return [k for k, v in list_scorers().items() if v.differentiable]


def scorer_info(name: str) -> ScorerInfo:
    infos = list_scorers()
    if name not in infos:
        raise UnknownRewardError(f"unknown reward '{name}'; valid rewards: {', '.join(infos)}")
    return infos[name]


def _resolve_factory(f: Callable | str) -> Callable:
    if isinstance(f, str):
        mod, attr = f.split(":")
        return getattr(importlib.import_module(mod), attr)
    return f


def get_scorer(name: str, *, ckpt_dir=None, device="cpu", backend: str | None = None) -> RewardScorer:
    """Build the scorer ``name`` (weights resolved now: ``ckpt_dir`` > ``$RTDMD_REWARD_CKPT_PATH``)."""
    info = scorer_info(name)
    if backend is not None and info.backends and backend not in info.backends:
        raise UnknownRewardError(f"unknown backend '{backend}' for reward '{name}'; valid backends: "
                                 f"{', '.join(info.backends)}")
    factory = _resolve_factory(_REGISTRY[name].factory)
    kwargs: dict[str, Any] = {"ckpt_dir": ckpt_dir, "device": device, "backend": backend}
    try:
        params = inspect.signature(factory).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
    except (TypeError, ValueError):
        pass
    obj = factory(**kwargs)
    if not isinstance(obj, RewardScorer):
        if not callable(obj):
            raise TypeError(f"factory of reward '{name}' returned {type(obj).__name__}, not a scorer")
        obj = FunctionScorer(name, obj, differentiable=info.differentiable, domain=info.domain, device=device)
    return obj
