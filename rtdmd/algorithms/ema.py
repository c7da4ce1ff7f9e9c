"""Exponential moving averages of generator parameters (spec: algorithm.md §6.7, §8.3, §12.3/4/14).

Two flavours, both keeping a *named* shadow of a set of parameters (``{name: tensor}``, an
``nn.Module`` or an iterable of ``(name, tensor)`` pairs):

* ``ModelEMA`` — stage 1 (cold start), §8.3::

      theta_ema <- decay * theta_ema + (1 - decay) * theta        (decay 0.99)

  applied on every ``every``-th call (``ema_every = 1`` in the configs).  Implemented as
  ``shadow.mul_(decay).add_(theta, alpha=1 - decay)`` in ``shadow_dtype``.

* ``PolicyEMA`` — stage 2, §6.7 (invariant 25)::

      skip unless (n + 1) % interval == 0
      d = min((1 + n) / (10 + n), decay)                          (interval 8, decay 0.9)
      ema <- ema + (1 - d) * (theta - ema)

  where ``n`` is the number of generator optimizer steps so far.

Both provide ``copy_to(params)`` and the context manager ``swapped_in(params)``, which clones the
live weights, copies the shadow in, and restores the clones bit-exactly on exit (also when the
body raises).

Deliberate departures from the reference
----------------------------------------
1. **Stage-1 shadow precision.**  The reference keeps the stage-1 EMA as a full bf16 model copy,
   which is "sticky" (small updates are rounded away, §12.3).  ``ModelEMA`` defaults to an fp32
   shadow; ``shadow_dtype=torch.bfloat16`` reproduces the reference quirk (same
   ``mul_``/``add_`` update in bf16).
2. **Swap-in always clones** the live weights (§12.14).  The reference stores the temporary copy
   with ``.cpu()``, which aliases the live storage for CPU parameters so its restore is a no-op
   there.
3. **Named shadows.**  The reference stage-2 state is a positional list of tensors; here the
   shadow is keyed by parameter name and ``load_state_dict`` checks names, shapes and the shadow
   dtype, so a mismatched resume fails loudly.  Hyper-parameters (decay, interval/every) always
   come from the constructor (config wins); only the shadow and counters are restored.
4. **Per-process state.**  Under FSDP each rank's shadow covers that rank's parameter shards; the
   reference saves rank 0's only (§12.12).  This class is per process: the trainer must save
   per-rank state (or gather) — nothing here assumes rank 0 speaks for all ranks.
5. ``PolicyEMA.step`` is a pure function of ``n``; where the trainer calls it (reference: after
   every training sub-batch, §12.4) is the trainer's decision.

``state_dict`` returns the live shadow tensors (not copies), like ``nn.Module.state_dict``;
all values are tensors, python scalars or strings, so the state can be written as
safetensors (shadow) + JSON (the rest) without pickling.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Union

import torch
from torch import nn

__all__ = ["ModelEMA", "PolicyEMA", "named_tensors"]

NamedParams = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]], nn.Module]


def named_tensors(params: NamedParams) -> dict[str, torch.Tensor]:
    """Normalise ``params`` to an ordered ``{name: tensor}`` dict."""
    if isinstance(params, nn.Module):
        out = dict(params.named_parameters())
    elif isinstance(params, Mapping):
        out = dict(params)
    else:
        out = {}
        for name, t in params:
            if name in out:
                raise ValueError(f"duplicate parameter name {name!r}")
            out[name] = t
    for name, t in out.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name!r} is not a tensor")
    if not out:
        raise ValueError("no parameters given")
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


class _Shadow:
    """Named shadow tensors with copy / swap helpers."""

    kind = "shadow"

    def __init__(self, params: NamedParams, shadow_dtype: torch.dtype | None, device: torch.device | str | None):
        named = named_tensors(params)
        self.shadow: dict[str, torch.Tensor] = {}
        for name, p in named.items():
            dtype = shadow_dtype if shadow_dtype is not None else p.dtype
            if not dtype.is_floating_point:
                raise TypeError(f"shadow dtype must be floating point, got {dtype}")
            self.shadow[name] = p.detach().to(device=device or p.device, dtype=dtype, copy=True)
        self.num_updates = 0

    # -- helpers -------------------------------------------------------------------------------
    def _match(self, params: NamedParams) -> dict[str, torch.Tensor]:
        named = named_tensors(params)
        if named.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - named.keys())
            extra = sorted(named.keys() - self.shadow.keys())
            raise KeyError(f"parameter names differ from the EMA's: missing {missing[:5]}, extra {extra[:5]}")
        for name, p in named.items():
            if p.shape != self.shadow[name].shape:
                raise ValueError(f"{name!r}: shape {tuple(p.shape)} != shadow {tuple(self.shadow[name].shape)}")
        return named

    def _pairs(self, params: NamedParams) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(shadows, live tensors on the shadows' device/dtype), in the same order, for the
        ``torch._foreach_*`` updates (one call per op instead of a Python loop over tensors;
        the same elementwise arithmetic, so bit-identical to the per-tensor loop)."""
        named = self._match(params)
        shadows = [self.shadow[n] for n in named]
        # callers run under no_grad: a tensor already on the shadow's device/dtype is read as is
        return shadows, [p if p.dtype == s.dtype and p.device == s.device else p.detach().to(device=s.device, dtype=s.dtype)
                         for p, s in zip(named.values(), shadows)]

    @torch.no_grad()
    def copy_to(self, params: NamedParams) -> None:
        """Overwrite the live parameters with the shadow (cast to each parameter's dtype)."""
        for name, p in self._match(params).items():
            p.copy_(self.shadow[name])

    @contextmanager
    def swapped_in(self, params: NamedParams) -> Iterator[None]:
        """Temporarily load the shadow into ``params``; restore the exact live weights on exit."""
        named = self._match(params)
        with torch.no_grad():
            backup = {name: p.detach().clone() for name, p in named.items()}
        self.copy_to(named)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in named.items():
                    p.copy_(backup[name])

    def _base_state(self) -> dict[str, Any]:
        dtypes = {_dtype_name(t.dtype) for t in self.shadow.values()}
        return {
            "kind": self.kind,
            "num_updates": self.num_updates,
            "shadow_dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
            "shadow": self.shadow,
        }

    @torch.no_grad()
    def _load_base(self, state: Mapping[str, Any]) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"state is for {state['kind']!r}, not {self.kind!r}")
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - shadow.keys())
            extra = sorted(shadow.keys() - self.shadow.keys())
            raise KeyError(f"EMA state names differ: missing {missing[:5]}, extra {extra[:5]}")
        for name, t in shadow.items():
            mine = self.shadow[name]
            if t.shape != mine.shape:
                raise ValueError(f"{name!r}: state shape {tuple(t.shape)} != {tuple(mine.shape)}")
            if t.dtype != mine.dtype:
                raise ValueError(f"{name!r}: state dtype {t.dtype} != shadow dtype {mine.dtype}")
        for name, t in shadow.items():
            self.shadow[name].copy_(t)
        self.num_updates = int(state["num_updates"])


class ModelEMA(_Shadow):
    """Stage-1 generator EMA: ``ema = decay*ema + (1-decay)*theta`` every ``every`` calls."""

    kind = "model_ema"

    def __init__(
        self,
        params: NamedParams,
        decay: float = 0.99,
        every: int = 1,
        shadow_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        super().__init__(params, shadow_dtype, device)
        self.decay = float(decay)
        self.every = int(every)
        self.num_calls = 0

    @torch.no_grad()
    def update(self, params: NamedParams, step: int | None = None) -> bool:
        """Apply one EMA update if ``step % every == 0``; returns whether it did.

        ``step`` defaults to an internal call counter (saved in the state dict).
        """
        if step is None:
            step = self.num_calls
        self.num_calls += 1
        if step % self.every != 0:
            return False
        shadows, src = self._pairs(params)
        torch._foreach_mul_(shadows, self.decay)
        torch._foreach_add_(shadows, src, alpha=1.0 - self.decay)
        self.num_updates += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        state = self._base_state()
        state.update(decay=self.decay, every=self.every, num_calls=self.num_calls)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._load_base(state)
        self.num_calls = int(state.get("num_calls", 0))


class PolicyEMA(_Shadow):
    """Stage-2 parameter EMA with warm-up decay ``min((1+n)/(10+n), decay)`` every ``interval``."""

    kind = "policy_ema"

    def __init__(
        self,
        params: NamedParams,
        decay: float = 0.9,
        interval: int = 8,
        shadow_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        super().__init__(params, shadow_dtype, device)
        self.decay = float(decay)
        self.interval = int(interval)

    def current_decay(self, n: int) -> float:
        return min((1.0 + n) / (10.0 + n), self.decay)

    @torch.no_grad()
    def step(self, params: NamedParams, n: int, repeats: int = 1) -> bool:
        """EMA update for optimizer-step count ``n``; returns whether an update happened.

        ``repeats`` applies the same update that many times in a row (identical parameters and
        ``n``): the reference calls ``step(n)`` after every one of its NB sub-batches, so at an
        update step the shadow receives NB updates of the same weights (retention ``d^NB``, §12.4).
        The loop (not ``d**NB``) keeps the rounding of a low-precision shadow as the reference's."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if (n + 1) % self.interval != 0:
            return False
        one_minus_d = 1.0 - self.current_decay(n)
        shadows, src = self._pairs(params)
        for _ in range(repeats):
            delta = torch._foreach_sub(src, shadows)
            torch._foreach_mul_(delta, one_minus_d)
            torch._foreach_add_(shadows, delta)
        self.num_updates += repeats
        return True

    update = step

    def state_dict(self) -> dict[str, Any]:
        state = self._base_state()
        state.update(decay=self.decay, interval=self.interval)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._load_base(state)
