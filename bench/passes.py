"""Record the network passes a training step makes, then replay each one in isolation.

The floor of a step is the sum of the passes it cannot avoid. Instead of re-deriving those
passes from the algorithm (and getting a count wrong), :class:`PassRecorder` watches one real
step of the trainer:

* forward hooks on the transformer roles (teacher, generator, fake score) record every call:
  role, whether autograd was on, and a clone of the inputs (first call of each distinct shape);
* thin wrappers record the text encoder (``backbone.encode_prompts``), the VAE decode
  (``backbone.decode``) and the reward model calls (``__call__`` / ``score_differentiable``);
* optimizer step hooks count optimizer steps.

:meth:`PassRecorder.replay_once` then re-runs one representative call of every recorded kind on
the *same modules* with the *same inputs*: a grad-enabled call is replayed as forward + backward
(a random cotangent on the output; gradients land on the LoRA parameters or on the input), a
no-grad call as a forward; an optimizer step as grad-norm clipping + ``step()`` on the existing
gradients. ``floor = Σ_kind count(kind) · median_time(kind)``.

Assumption (checked for these trainers): every grad-enabled forward is part of the loss graph,
i.e. gets a backward. Replayed optimizer steps do change the LoRA weights (tiny random updates);
that does not matter for timing.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _sig(x) -> Any:
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, (list, tuple)):
        return tuple(_sig(v) for v in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _sig(v)) for k, v in x.items()))
    return None


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for v in out:
            t = _first_tensor(v) if not isinstance(v, torch.Tensor) else v
            if isinstance(t, torch.Tensor):
                return t
    raise TypeError(f"no tensor in output of type {type(out).__name__}")


def _backward_all(out) -> None:
    """Backward of a random projection of every floating tensor in ``out`` that needs grad."""
    ts = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            if x.requires_grad and x.is_floating_point():
                ts.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(out)
    if ts:
        loss = sum((t.float() * torch.randn_like(t, dtype=torch.float32)).sum() for t in ts)
        loss.backward()


@dataclass
class Kind:
    name: str  # e.g. "generator fwd+bwd [2, 64, 16]"
    pass_type: str  # "text encode", "generator fwd", ...
    replay: Callable[[], None]
    count: int = 0
    times: list[float] = field(default_factory=list)


class _RewardProxy:
    """Forwards everything to a reward scorer, recording ``__call__`` / ``score_differentiable``."""

    def __init__(self, inner, rec: "PassRecorder", label: str):
        self._inner, self._rec, self._label = inner, rec, label

    def __call__(self, images, prompts, metadata=None, **kw):
        self._rec._record_fn(f"{self._label} fwd", (images, prompts, metadata), lambda a: self._inner(*a, **kw),
                             grad=False)
        return self._inner(images, prompts, metadata, **kw)

    def score_differentiable(self, images, prompts, metadata=None):
        grad = torch.is_grad_enabled() and isinstance(images, torch.Tensor) and images.requires_grad
        self._rec._record_fn(f"{self._label} fwd+bwd" if grad else f"{self._label} fwd", (images, prompts, metadata),
                             lambda a: self._inner.score_differentiable(*a)["mean"], grad=grad, grad_arg=0)
        return self._inner.score_differentiable(images, prompts, metadata)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class PassRecorder:
    def __init__(self):
        self.kinds: dict[tuple, Kind] = {}
        self.active = False
        self._handles: list[Any] = []
        self._restore: list[Callable[[], None]] = []
        self._optims: dict[str, tuple[torch.optim.Optimizer, list[nn.Parameter], float]] = {}

    # ------------------------------------------------------------------------------- recording
    @contextlib.contextmanager
    def recording(self):
        """Count passes inside the block (counts are reset first)."""
        for k in self.kinds.values():
            k.count = 0
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def _kind(self, key: tuple, name: str, pass_type: str, make_replay: Callable[[], Callable[[], None]]) -> None:
        if key not in self.kinds:
            self.kinds[key] = Kind(name, pass_type, make_replay())
        self.kinds[key].count += 1

    def watch_module(self, label: str, module: nn.Module) -> None:
        def hook(mod, args, kwargs, output):
            if not self.active:
                return
            grad = torch.is_grad_enabled() and _first_tensor(output).requires_grad
            sig = (_sig(args), _sig(kwargs))
            ptype = f"{label} {'fwd+bwd' if grad else 'fwd'}"

            def make():
                a, kw = _clone(args), _clone(kwargs)

                def replay():
                    if grad:
                        out = mod(*a, **kw)
                        _backward_all(out)
                    else:
                        with torch.no_grad():
                            mod(*a, **kw)
                return replay
            self._kind(("module", label, grad, sig), f"{ptype} {_shape_label(args, kwargs)}", ptype, make)

        self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def _record_fn(self, ptype: str, args: tuple, call: Callable[[tuple], Any], *, grad: bool,
                   grad_arg: int | None = None) -> None:
        if not self.active:
            return
        sig = (ptype, _sig(args), grad)

        def make():
            a = _clone(args)

            def replay():
                if grad:
                    aa = list(a)
                    if grad_arg is not None:
                        aa[grad_arg] = a[grad_arg].detach().requires_grad_(True)
                    out = call(tuple(aa))
                    _backward_all(out)
                else:
                    with torch.no_grad():
                        call(a)
            return replay
        self._kind(("fn",) + sig, f"{ptype} {_shape_label(args, {})}", ptype, make)

    def watch_method(self, obj: Any, attr: str, label: str, grad_arg: int | None = 0) -> None:
        """Record calls of ``obj.attr(x, ...)``; grad replay differentiates w.r.t. argument ``grad_arg``."""
        orig = getattr(obj, attr)

        def wrapper(*args, **kw):
            x = args[grad_arg] if grad_arg is not None and args else None
            grad = (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad)
            self._record_fn(f"{label} {'fwd+bwd' if grad else 'fwd'}", args, lambda a: orig(*a, **kw), grad=grad,
                            grad_arg=grad_arg)
            return orig(*args, **kw)

        setattr(obj, attr, wrapper)
        self._restore.append(lambda: delattr(obj, attr) if attr in vars(obj) else None)

    def reward_proxy(self, scorer, label: str = "reward"):
        return _RewardProxy(scorer, self, label)

    def watch_optimizer(self, label: str, opt: torch.optim.Optimizer, params: list[nn.Parameter],
                        max_norm: float) -> None:
        self._optims[label] = (opt, params, max_norm)

        def hook(optimizer, args, kwargs):
            if not self.active:
                return

            def make():
                def replay():
                    for p in params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                    torch.nn.utils.clip_grad_norm_(params, max_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                return replay
            self._kind(("optim", label), f"{label} optimizer step (clip + AdamW)", "optimizer step", make)

        self._handles.append(opt.register_step_post_hook(hook))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        for r in self._restore:
            r()
        self._handles, self._restore = [], []

    # ------------------------------------------------------------------------------- replay
    def replay_once(self, reps: int = 3, counts: dict[tuple, int] | None = None) -> float:
        """Replay every recorded kind ``min(count, reps)`` times back to back (as the step runs
        repeated passes back to back), append each call's time to ``Kind.times``; returns this
        round's floor ``Σ count · median(this round's times)``."""
        import statistics

        floor = 0.0
        for key, k in self.kinds.items():
            n = (counts or {}).get(key, k.count)
            this = []
            for _ in range(min(n, reps)):
                t = time.perf_counter()
                k.replay()
                this.append(time.perf_counter() - t)
            k.times += this
            if this:
                floor += n * statistics.median(this)
        for opt, params, _ in self._optims.values():
            opt.zero_grad(set_to_none=True)
        return floor

    def floor(self, counts: dict[tuple, float] | None = None, use_min: bool = False
              ) -> tuple[float, list[dict[str, Any]]]:
        """``(Σ count·median, rows)`` (``use_min``: Σ count·min); ``counts`` overrides the recorded counts."""
        import statistics

        total, rows = 0.0, []
        for key, k in self.kinds.items():
            n = counts.get(key, 0) if counts is not None else k.count
            if not n or not k.times:
                continue
            m = min(k.times) if use_min else statistics.median(k.times)
            total += n * m
            rows.append({"pass": k.name, "type": k.pass_type, "count": n, "median_ms": 1e3 * m,
                         "min_ms": 1e3 * min(k.times), "total_ms": 1e3 * n * m})
        return total, rows

    def counts(self) -> dict[tuple, int]:
        return {key: k.count for key, k in self.kinds.items()}


def _shape_label(args, kwargs) -> str:
    for x in list(args) + list(kwargs.values()):
        if isinstance(x, torch.Tensor):
            return "x" + "×".join(map(str, x.shape))
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], str):
            return f"{len(x)} prompts"
    return ""
