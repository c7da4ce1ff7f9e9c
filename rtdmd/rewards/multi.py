"""Weighted multi-reward scorer (rewards.md §2) and reward → dataset routing.

``MultiScorer({name: weight}, ckpt_dir=None, device="cpu", batch_size=16, backends=None)``

* names are checked at construction (:class:`UnknownRewardError` lists the valid ones);
  scorers are built **lazily** on first use and **shared** through a
  module-level cache keyed by ``(name, resolved ckpt dir, device, backend)``
  (:func:`shared_scorer`, :func:`clear_scorer_cache`);
* ``__call__(images, prompts, metadata=None, only_strict=False)`` quantises the
  images to 8 bit once (rewards.md §0), scores in chunks of ``batch_size`` and
  returns ``{name: 1-D float32 tensor, ..., "mean": tensor}``. ``"mean"`` keeps
  the reference's name but is the **weighted sum** ``Σ wᵢ·scoreᵢ`` (not divided
  by ``Σw``). For ``geneval`` the extra reference keys ``accuracy``,
  ``strict_accuracy``, ``{tag}_accuracy`` and ``{tag}_strict_accuracy`` (−10
  sentinels for other tags) are added at top level, as in the reference;
* ``score_differentiable(images, prompts)`` is the BP reward: the same dict over
  the differentiable rewards with non-zero weight (others are skipped with a
  warning, as the reference does for geneval), with gradients.

Unlike the reference there is no ``allow_unavailable``: a reward that cannot be
built raises when first used (the eval driver decides whether to skip it).
"""

from __future__ import annotations

import threading
import warnings
from typing import Mapping

import torch

from .base import ImageBatch, RewardScorer, validate_images, validate_metadata, validate_prompts
from .ckpt import resolve_ckpt_root
from .errors import RewardInputError, RewardRoutingError, UnknownRewardError
from .registry import get_scorer, list_scorers

__all__ = ["MultiScorer", "shared_scorer", "clear_scorer_cache", "DEFAULT_REWARD_DATASETS", "route_rewards"]

_CACHE: dict[tuple, RewardScorer] = {}
_CACHE_LOCK = threading.Lock()

#: The reference's default ``reward_dataset_map`` (rewards.md §2).
DEFAULT_REWARD_DATASETS = {
    "pickscore": "drawbench", "aesthetic": "drawbench", "clipscore": "drawbench", "hpsv2": "drawbench",
    "imagereward": "drawbench", "hpsv3": "hpsv3", "geneval": "geneval", "geneval2": "geneval2", "ocr": "ocr",
}


def _cache_key(name: str, ckpt_dir, device, backend) -> tuple:
    root = resolve_ckpt_root(ckpt_dir)
    return (name, str(root.resolve()) if root is not None else str(ckpt_dir), str(torch.device(device)), backend)


def shared_scorer(name: str, *, ckpt_dir=None, device="cpu", backend: str | None = None) -> RewardScorer:
    """``get_scorer`` through the module-level cache (one instance per name/ckpt/device/backend)."""
    key = _cache_key(name, ckpt_dir, device, backend)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = get_scorer(name, ckpt_dir=ckpt_dir, device=device, backend=backend)
        return _CACHE[key]


def clear_scorer_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def route_rewards(rewards: list[str], available_datasets: list[str] | None = None,
                  reward_dataset_map: Mapping[str, str] | None = None,
                  default_dataset: str | None = None) -> dict[str, list[str]]:
    """Group rewards by the dataset they are evaluated on: ``{dataset: [reward, ...]}``.

    ``reward_dataset_map`` overrides :data:`DEFAULT_REWARD_DATASETS`; a reward in
    neither goes to ``default_dataset`` (the reference's ``cfg.dataset`` /
    ``"prompt_file"``) or, without one, raises :class:`RewardRoutingError`. A
    reward routed to a dataset not in ``available_datasets`` raises
    :class:`RewardRoutingError`.
    """
    infos = list_scorers()
    m = dict(DEFAULT_REWARD_DATASETS)
    m.update(reward_dataset_map or {})
    out: dict[str, list[str]] = {}
    for r in rewards:
        if r not in infos:
            raise UnknownRewardError(f"unknown reward '{r}'; valid rewards: {', '.join(infos)}")
        if r not in m and default_dataset is None:
            raise RewardRoutingError(f"reward '{r}' has no dataset in the reward→dataset map {m}")
        ds = m.get(r, default_dataset)
        if available_datasets is not None and ds not in available_datasets:
            raise RewardRoutingError(f"reward '{r}' is routed to dataset '{ds}', which is not available "
                                     f"(available: {', '.join(available_datasets) or 'none'})")
        out.setdefault(ds, []).append(r)
    return out


class MultiScorer:
    def __init__(self, weights: Mapping[str, float], *, ckpt_dir=None, device="cpu", batch_size: int = 16,
                 backends: Mapping[str, str] | None = None):
        if not isinstance(weights, Mapping) or not weights:
            raise RewardInputError("MultiScorer needs a non-empty {reward_name: weight} mapping")
        infos = list_scorers()
        unknown = [n for n in weights if n not in infos]
        if unknown:
            raise UnknownRewardError(f"unknown reward(s) {unknown}; valid rewards: {', '.join(infos)}")
        backends = dict(backends or {})
        bad = [n for n in backends if n not in weights]
        if bad:
            raise UnknownRewardError(f"backends given for rewards not in weights: {bad}")
        if int(batch_size) < 1:
            raise RewardInputError(f"batch_size must be >= 1, got {batch_size}")
        domains = {infos[n].domain for n in weights}
        if len(domains) > 1:
            raise RewardInputError(f"MultiScorer rewards must share one input domain; got {sorted(domains)}")
        self.weights = {n: float(w) for n, w in weights.items()}
        self.ckpt_dir, self.device, self.batch_size, self.backends = ckpt_dir, device, int(batch_size), backends
        self.domain = domains.pop()
        self._infos = {n: infos[n] for n in weights}

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    def differentiable_names(self) -> list[str]:
        return [n for n in self.weights if self._infos[n].differentiable]

    def scorer(self, name: str) -> RewardScorer:
        if name not in self.weights:
            raise UnknownRewardError(f"reward '{name}' is not part of this MultiScorer ({', '.join(self.weights)})")
        return shared_scorer(name, ckpt_dir=self.ckpt_dir, device=self.device, backend=self.backends.get(name))

    def _validate(self, images, prompts, metadata):
        if self.domain == "image":
            batch = validate_images(images)  # quantise once (rewards.md §0)
            n = len(batch)
        else:
            if not isinstance(images, torch.Tensor) or images.ndim < 1 or images.shape[0] == 0:
                raise RewardInputError(f"expected a non-empty tensor [B,...] of {self.domain}")
            batch, n = images, images.shape[0]
        prompts = validate_prompts(prompts, n)
        metadata = validate_metadata(metadata, n)
        return batch, prompts, metadata, n

    def __call__(self, images, prompts, metadata=None, only_strict: bool = False) -> dict[str, torch.Tensor]:
        batch, prompts, metadata, n = self._validate(images, prompts, metadata)
        parts: dict[str, list[torch.Tensor]] = {}
        for name in self.weights:
            sc = self.scorer(name)
            for s in range(0, n, self.batch_size):
                e = min(s + self.batch_size, n)
                sub = batch.slice(s, e) if isinstance(batch, ImageBatch) else batch[s:e]
                md = metadata[s:e] if metadata is not None else None
                if hasattr(sc, "score_details"):
                    det = sc.score_details(sub, prompts[s:e], md, only_strict=only_strict)
                    det = {(name if k == sc.name else k): v for k, v in det.items()}
                else:
                    det = {name: sc(sub, prompts[s:e], md)}
                for k, v in det.items():
                    parts.setdefault(k, []).append(v.detach().float().cpu().reshape(-1))
        out = {k: torch.cat(v) for k, v in parts.items()}
        mean = torch.zeros(n, dtype=torch.float32)
        for name, w in self.weights.items():
            mean = mean + w * out[name]
        out["mean"] = mean
        return out

    def score_differentiable(self, images, prompts, metadata=None) -> dict[str, torch.Tensor]:
        """BP reward over the differentiable rewards with non-zero weight; ``"mean"`` = weighted sum."""
        use = [n for n, w in self.weights.items() if w != 0 and self._infos[n].differentiable]
        skipped = [n for n, w in self.weights.items() if w != 0 and not self._infos[n].differentiable]
        if skipped:
            warnings.warn(f"rewards {skipped} are not differentiable and are ignored for back-propagation")
        if not use:
            from .errors import RewardNotDifferentiableError

            raise RewardNotDifferentiableError(
                f"none of {list(self.weights)} is differentiable; differentiable rewards: "
                f"{', '.join(n for n, i in list_scorers().items() if i.differentiable)}")
        out: dict[str, torch.Tensor] = {}
        total = None
        for name in use:
            r = self.scorer(name).score_differentiable(images, prompts, metadata)
            out[name] = r
            total = self.weights[name] * r if total is None else total + self.weights[name] * r
        out["mean"] = total
        return out

    def to(self, device) -> "MultiScorer":
        """Move the already-built scorers and build later ones on ``device``."""
        for name in self.weights:
            key = _cache_key(name, self.ckpt_dir, self.device, self.backends.get(name))
            sc = _CACHE.pop(key, None)
            if sc is not None:
                sc.to(device)
                _CACHE[_cache_key(name, self.ckpt_dir, device, self.backends.get(name))] = sc
        self.device = device
        return self

    def __repr__(self) -> str:
        return f"MultiScorer({self.weights}, device={self.device!r}, batch_size={self.batch_size})"
