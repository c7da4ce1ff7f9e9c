"""Regional compilation of the repeated transformer blocks (``distributed.compile``).

Only the blocks that repeat (the classes a diffusers model declares in ``_repeated_blocks``, e.g.
FLUX.2's double- and single-stream blocks; otherwise every member of a top-level
``nn.ModuleList``) are compiled, each in place with ``Module.compile`` — what diffusers'
``compile_repeated_blocks`` does, except that classes are matched through the MRO, because
FSDP2's ``fully_shard`` re-classes every sharded block (``FSDPFlux2TransformerBlock``), which
diffusers' exact class-name match would miss; embeddings, the time/guidance MLPs and the output head stay
eager. Because torch inlines ``nn.Module`` calls and treats parameters as graph inputs, all blocks
of one class share one compiled graph, so the compile cost is per block *class*, not per block.
Applied after LoRA injection and after DDP / FSDP2 wrapping (FSDP2 then sees compiled blocks under
its per-block hooks, the order torch recommends). σ reaches the blocks only as the tensor ``temb``,
so changing σ never recompiles; each distinct (batch shape, grad mode) pair of a stage compiles
once during warm-up (forward with grad, backward, no-grad rollout).

Departure: none from the method — compiled kernels reorder floating-point reductions, so results
differ from eager by rounding only (fp32: relative ~1e-5, see the tests).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def wants_compile(cfg, device_type: str) -> bool:
    return cfg.enabled == "always" or (cfg.enabled == "cuda" and device_type == "cuda")


def repeated_blocks(net: nn.Module) -> list[nn.Module]:
    """The modules regional compilation targets (see the module docstring)."""
    names = getattr(net, "_repeated_blocks", None)
    if names:  # by class or base class: FSDP2 re-classes a sharded module as ``FSDP<Name>(<Name>)``
        return [m for m in net.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    return [b for child in net.children() if isinstance(child, nn.ModuleList) for b in child]


def compile_kwargs(cfg) -> dict:
    kw = {"dynamic": cfg.dynamic, "fullgraph": cfg.fullgraph, "backend": cfg.backend}
    if cfg.mode != "default":
        if cfg.backend != "inductor":
            raise ValueError(f"distributed.compile.mode={cfg.mode} needs backend inductor, got {cfg.backend}")
        kw["mode"] = cfg.mode
    return kw


def compile_blocks(nets: list[nn.Module], cfg, device_type: str, log: Callable[[str], None] = print) -> int:
    """Compile the repeated blocks of every net in place (when ``cfg`` asks for it on this device);
    returns the number of blocks compiled."""
    if not wants_compile(cfg, device_type):
        return 0
    kw = compile_kwargs(cfg)
    count = 0
    for net in nets:
        blocks = repeated_blocks(net)
        if not blocks:
            log(f"note: distributed.compile: {type(net).__name__} has no repeated blocks; left eager")
            continue
        for block in blocks:
            block.compile(**kw)
        count += len(blocks)
    log(f"distributed.compile: {count} blocks compiled ({', '.join(f'{k}={v}' for k, v in kw.items())})")
    return count


def compiles_so_far() -> int:
    """Frames dynamo has compiled in this process (each recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def reset_compile_state() -> None:
    torch._dynamo.reset()
