"""Several named LoRA adapters on one module, selected per call (one frozen base, several roles).

PEFT keeps the active adapter(s) as state on every LoRA layer (``_active_adapter``); its own
``set_adapter`` / ``enable_adapters`` also flip ``requires_grad`` of the inactive adapters, which
would silently stop the accumulation of gradients another role's forward has already recorded.
:func:`active_adapters` therefore sets only the active list (an empty list = the frozen base,
i.e. "adapters off": every LoRA layer computes exactly ``base_layer(x)``) and restores it on exit.

Gradient checkpointing recomputes a block's forward during backward, when another role may be
active: :func:`checkpoint_func` (for diffusers' ``enable_gradient_checkpointing``) records the
adapters active when the block ran forward and re-activates them for the recomputation through
``torch.utils.checkpoint``'s ``context_fn`` (non-reentrant checkpointing, as diffusers' default).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

_LAYERS = "_rtdmd_lora_layers"
_ACTIVE = "_rtdmd_active"


def lora_layers(net: nn.Module) -> list[nn.Module]:
    """The PEFT LoRA layers of ``net`` (cached on ``net``; call :func:`forget_layers` after injecting)."""
    layers = net.__dict__.get(_LAYERS)
    if layers is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
        net.__dict__[_LAYERS] = layers
    return layers


def forget_layers(net: nn.Module) -> None:
    net.__dict__.pop(_LAYERS, None)


def current_adapters(net: nn.Module) -> tuple[str, ...]:
    return net.__dict__.get(_ACTIVE, ())


@contextlib.contextmanager
def active_adapters(net: nn.Module, names: tuple[str, ...]):
    """Within the block, exactly the adapters ``names`` act on ``net`` (``()`` = the base alone)."""
    layers = lora_layers(net)
    before = [layer._active_adapter for layer in layers]
    prev = current_adapters(net)
    for layer in layers:
        layer._active_adapter = list(names)
    net.__dict__[_ACTIVE] = tuple(names)
    try:
        yield
    finally:
        for layer, value in zip(layers, before):
            layer._active_adapter = value
        net.__dict__[_ACTIVE] = prev


def checkpoint_func(net: nn.Module):
    """A diffusers ``gradient_checkpointing_func`` that recomputes with the adapters that were
    active on ``net`` when the checkpointed block ran forward."""

    def run(module, *args):
        names = current_adapters(net)
        return torch.utils.checkpoint.checkpoint(
            module.__call__, *args, use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _Reactivate(net, names)))

    return run


class _Reactivate:
    """Re-enterable context (a recomputation may run more than once, e.g. with ``retain_graph``)."""

    def __init__(self, net: nn.Module, names: tuple[str, ...]):
        self.net, self.names, self.stack = net, names, []

    def __enter__(self):
        cm = active_adapters(self.net, self.names)
        cm.__enter__()
        self.stack.append(cm)

    def __exit__(self, *exc):
        return self.stack.pop().__exit__(*exc)
