"""Load a role's transformer without the peak under FSDP2 (``distributed.fsdp_load: meta``).

The whole-model path loads every transformer with ``from_pretrained`` and moves it to the device
before ``fully_shard`` splits it. Here a role whose weights are a diffusers safetensors directory
(local or a hub repo, :meth:`DiffusersBackbone.transformer_files`) is instead

1. built on the meta device from its config (:meth:`DiffusersBackbone.empty_transformer`);
2. given its LoRA adapters with real values: PEFT creates them on the device of the base layer, so
   each meta Linear weight is swapped for a one-element CPU tensor expanded to its shape while the
   adapters are injected (:func:`lora_on_meta`) — the same modules, init and RNG draws as on a
   loaded model — and swapped back;
3. sharded by ``fully_shard`` as before (LoRA and buffers move to the device; meta stays meta);
4. materialised (:func:`materialize`): ``to_empty`` allocates this rank's shards, LoRA shards and
   buffers are put back, and the safetensors files are streamed one tensor at a time: the tensor
   is read on the host, cast to the model dtype, has the role's ``--init`` chain merged into it as
   :func:`rtdmd.lora.merge_lora_into_base` would (fp32 ``W + s·BA``, in chain order), and only this
   rank's shard is kept (``distribute_tensor(..., src_data_rank=None)``: every rank reads the same
   file, no communication).

So a rank holds its shards plus one full parameter at a time on the device, never a whole
transformer. Any other source (a state-dict file as ``model.generator_init``) loads whole, with a
note. A simulated rank (``rtdmd.plan``) streams simulated files (``rtdmd.plan.models``).
"""
from __future__ import annotations

import torch
from torch import nn

from rtdmd.lora.core import pairs

_PENDING = "_rtdmd_pending_load"


def lora_on_meta(net: nn.Module, inject) -> None:
    """``inject(net)`` on a meta model, with real LoRA values (see the module docstring, 2.)."""
    swapped = []
    for m in net.modules():
        if isinstance(m, nn.Linear) and m.weight.is_meta:
            w = m.weight
            m.weight = nn.Parameter(torch.empty((), dtype=w.dtype).expand(w.shape), requires_grad=False)
            swapped.append((m, w))
    try:
        inject(net)
    finally:
        for m, w in swapped:
            m.weight = w


def empty_role(backbone, role: str, merges: list, log):
    """The role's transformer on the meta device with its pending load recorded, or ``None``."""
    found = backbone.transformer_files(role) if hasattr(backbone, "transformer_files") else None
    if found is None:
        log(f"note: fsdp_load=meta: the {role} weights are not a safetensors diffusers directory; loaded whole")
        return None
    config, files = found
    net = backbone.empty_transformer(config)
    net.__dict__[_PENDING] = (files, merges)
    return net


def pending(net: nn.Module) -> bool:
    return _PENDING in net.__dict__


def _merged(key: str, t: torch.Tensor, merges: list) -> torch.Tensor:
    module = key[: -len(".weight")] if key.endswith(".weight") else None
    for state, scale in merges:
        ab = pairs(state).get(module)
        if ab is None:
            continue
        delta = (ab[1].float() @ ab[0].float()) * scale
        if tuple(delta.shape) != tuple(t.shape):
            delta = delta.T
        t = (t.float() + delta).to(t.dtype)
    return t


@torch.no_grad()
def materialize(net: nn.Module, device) -> None:
    """Allocate this rank's shards and fill them (see the module docstring, 4.)."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, distribute_tensor

    files, merges = net.__dict__.pop(_PENDING)
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    keep = {n: local(t).clone() for n, t in [*net.named_parameters(), *net.named_buffers()] if not t.is_meta}
    todo = {n.replace(".base_layer.", "."): n for n, p in net.named_parameters() if p.is_meta}
    net.to_empty(device=device)
    tensors = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    for n, t in [*net.named_parameters(), *net.named_buffers()]:
        if n in keep:
            local(t).copy_(keep[n])
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key in buffers:  # a persistent buffer: the file's value
                    buffers[key].copy_(f.get_tensor(key).to(buffers[key].dtype))
                    continue
                name = todo.pop(key, None)
                if name is None:
                    raise KeyError(f"{path}: tensor {key!r} matches no parameter of {type(net).__name__}")
                p = tensors[name]
                t = _merged(key, f.get_tensor(key).to(p.dtype), merges).to(device)
                if isinstance(p, DTensor):
                    t = distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None).to_local()
                local(p).copy_(t)
    if todo:
        raise KeyError(f"{files[0]}: no weights for {sorted(todo)[:5]}")
