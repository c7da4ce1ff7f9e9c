"""Build the transformer roles of a training stage and wrap them for distribution (spec §8.1, §8.2).

* ``distributed.share_base`` (default true): roles whose base weights are identical share one
  frozen base with a LoRA adapter per role, the teacher being the base with adapters off
  (:mod:`rtdmd.train.shared_base`: which roles share, stage 2, gradient checkpointing, DDP/FSDP2,
  compile); false = the reference's separate copy per role, as described below.
* ``distributed.fsdp_load`` (default ``meta``): under FSDP each transformer is built on the meta
  device, sharded, and its weights streamed in shard by shard (:mod:`rtdmd.train.sharded_load`);
  ``whole`` = load it whole, then shard.
* teacher: ``backbone.load_transformer("teacher")``, frozen, ``eval()``; never checkpointed.
* generator / fake score: ``backbone.load_transformer(role)`` + a fresh LoRA
  (``lora.rank/alpha/targets/init``). With ``--init URI`` the artifact chain
  (:func:`rtdmd.lora.artifact.stack_chain`) is merged into the base in order and a fresh adapter
  is injected (:func:`rtdmd.lora.stack_and_refresh`, §8.1 "merge_before_training").
* LoRA master weights in ``lora.master_dtype`` (§12.1: bf16 in the paper params, as the reference;
  fp32 for the tiny models).
* ``distributed.strategy``: ``none``; ``ddp`` (``find_unused_parameters=True``, no buffer sync
  in forward — ``forward_sync_buffers=False``, torch's successor of ``broadcast_buffers=False``;
  the teacher stays a plain module); ``fsdp`` = FSDP2
  ``fully_shard`` on every block of each transformer ``ModuleList`` and then on the root, for
  generator, fake score and teacher. ``fsdp_sharding``: ``full_shard``; ``shard_grad_op`` =
  no reshard after forward (ZeRO-2 like); ``hybrid_shard`` = a (nodes × local) mesh
  (replicate × shard) — on one node this is full sharding (logged).
* ``mixed_precision`` bf16/fp16: FSDP param dtype (grads reduced in fp32) or autocast for
  DDP/none — on CPU it falls back to fp32 with a logged note (bf16 matmuls are ~10× slower there).
* ``gradient_checkpointing``: diffusers' ``enable_gradient_checkpointing`` on generator and
  fake score (no-op with a note for toy2d). ``offload_frozen``: FSDP CPU offload of the teacher
  on GPU; a no-op with a note on CPU or without FSDP.
* ``compile``: regional compilation of the repeated blocks of every role, after wrapping
  (:mod:`rtdmd.train.compiling`).

Parameters are addressed through the *unwrapped* module (``Roles.raw``), so names have no
``module.`` prefix; with FSDP2 they are DTensor shards — :func:`full_tensor` gathers (a
collective: call on every rank) and :func:`shard_like` re-shards a full tensor. FSDP2 leaves a
module unsharded after a forward without backward (always for the root, for every block with
``shard_grad_op``): call :meth:`Roles.reshard` before reading or writing parameters outside a
training step (the base trainer does so after every step, around evaluation and before saving).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from rtdmd.dist import full_tensor, shard_like
from rtdmd.lora import inject_lora, lora_parameters, reinit_lora, stack_and_refresh
from rtdmd.lora.core import canonical_key
from rtdmd.train.compiling import compile_blocks
from rtdmd.train.shared_base import RoleView, build_shared, shares_base
from rtdmd.train.sharded_load import empty_role, lora_on_meta, materialize, pending

TRAINABLE = ("generator", "fake_score")


class _DDP(nn.parallel.DistributedDataParallel):
    """DDP that forwards unknown attributes (``.config``, ...) to the wrapped model."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


@dataclass
class Roles:
    teacher: nn.Module
    nets: dict[str, nn.Module]  # callables (wrapped)
    raw: dict[str, nn.Module]  # unwrapped (parameter names without wrapper prefixes)
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    parent: dict = field(default_factory=dict)  # {"uri", "manifest_sha256"} of an --init artifact
    # looked up once (the modules are fully built and wrapped before ``Roles`` is made): the
    # trainers read them every step (EMA, reshard), a walk over every module otherwise
    _lora: dict = field(default_factory=dict, init=False, repr=False)
    _fsdp: list | None = field(default=None, init=False, repr=False)

    def lora_params(self, role: str) -> dict[str, nn.Parameter]:
        """The role's trainable LoRA parameters (names as in the separate-copies layout)."""
        params = self._lora.get(role)
        if params is None:
            net = self.raw[role]
            params = self._lora[role] = net.lora_params() if isinstance(net, RoleView) else lora_parameters(net)
        return dict(params)

    def modules(self) -> list[nn.Module]:
        """Every distinct transformer (a shared base once)."""
        out = []
        for net in (self.teacher, *self.raw.values()):
            net = net.base if isinstance(net, RoleView) else net
            if all(net is not m for m in out):
                out.append(net)
        return out

    def lora_state(self, role: str) -> dict[str, torch.Tensor]:
        """Canonical full LoRA state (fp32 CPU); collective under FSDP."""
        return {canonical_key(n): full_tensor(p.detach()).float().cpu().clone()
                for n, p in self.lora_params(role).items()}

    def reshard(self) -> None:
        """Free FSDP2 unsharded parameters (no-op otherwise). Needed before touching parameters
        outside forward/backward (EMA, checkpoint, swaps): after a forward without backward —
        the root module, or every module with ``shard_grad_op`` — FSDP2 keeps them unsharded."""
        from torch.distributed.fsdp import FSDPModule

        if self._fsdp is None:
            self._fsdp = [m for net in self.modules() for m in net.modules() if isinstance(m, FSDPModule)]
        for m in self._fsdp:
            m.reshard()

    @torch.no_grad()
    def load_lora_state(self, role: str, state: dict[str, torch.Tensor]) -> None:
        params = {canonical_key(n): p for n, p in self.lora_params(role).items()}
        if set(params) != set(state):
            diff = sorted(set(params) ^ set(state))
            raise ValueError(f"{role} LoRA keys differ from the checkpoint: {diff[:5]}")
        for key, p in params.items():
            p.copy_(shard_like(p, state[key]))


def _fsdp_mesh(env, sharding: str, log):
    from torch.distributed.device_mesh import init_device_mesh

    dev = env.device.type
    if sharding == "hybrid_shard" and env.num_nodes > 1:
        return init_device_mesh(dev, (env.num_nodes, env.local_world), mesh_dim_names=("replicate", "shard"))
    if sharding == "hybrid_shard":
        log("note: fsdp_sharding=hybrid_shard on a single node is full sharding")
    return init_device_mesh(dev, (env.world,))


def _shard(net: nn.Module, mesh, *, reshard: bool, mp, offload: bool) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    kw = {"mesh": mesh, "reshard_after_forward": reshard}
    if mp is not None:
        kw["mp_policy"] = mp
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for child in net.children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                fully_shard(block, **kw)
    fully_shard(net, **kw)


def _base(backbone, role, meta: bool, merges: list, log):
    """``(net, empty)``: the role's frozen transformer, on the meta device when ``meta`` allows."""
    net = empty_role(backbone, role, merges, log) if meta else None
    if net is not None:
        return net, True
    return backbone.load_transformer(role).eval().requires_grad_(False), False


def _load_role(backbone, params, role, chain, log, meta: bool = False) -> nn.Module:
    lcfg = params.lora
    states = [(art.adapters[role].state, art.adapters[role].scale) for art in chain if role in art.adapters]
    net, empty = _base(backbone, role, meta, states, log)

    def inject(net):
        if states and not empty:
            stack_and_refresh(net, states, list(lcfg.targets), lcfg.rank, lcfg.alpha, reinit=lcfg.reinit_after_merge)
        elif states:  # merged while the weights stream in (rtdmd.train.sharded_load)
            inject_lora(net, list(lcfg.targets), lcfg.rank, lcfg.alpha)
            if lcfg.reinit_after_merge == "reference":
                reinit_lora(net, reinit="reference")
        else:
            inject_lora(net, list(lcfg.targets), lcfg.rank, lcfg.alpha, init=lcfg.init)

    if empty:
        lora_on_meta(net, inject)
    else:
        inject(net)
    if states:
        log(f"{role}: merged {len(states)} LoRA artifact(s) into the base, fresh adapter injected")
    master = torch.bfloat16 if lcfg.master_dtype == "bfloat16" else torch.float32
    for p in lora_parameters(net).values():
        p.data = p.data.to(master)  # lora.master_dtype (§12.1)
    if params.distributed.gradient_checkpointing:
        if hasattr(net, "enable_gradient_checkpointing"):
            net.enable_gradient_checkpointing()
        else:
            log(f"note: gradient_checkpointing is not supported by {type(net).__name__}; ignored")
    return net


def _load_roles(backbone, params, roles, chain, log, meta: bool) -> tuple[nn.Module, dict[str, nn.Module]]:
    """Teacher + role nets: one shared base for the roles that share it (``share_base``), else copies;
    on the meta device where ``meta`` (``fsdp_load: meta`` under FSDP) allows."""
    share = params.distributed.share_base
    if share and not hasattr(backbone, "role_source"):
        log(f"note: share_base: {type(backbone).__name__} declares no role sources; separate copies per role")
    if not share or not hasattr(backbone, "role_source"):
        teacher = _base(backbone, "teacher", meta, [], log)[0]
        return teacher, {role: _load_role(backbone, params, role, chain, log, meta) for role in roles}
    sharing = [r for r in roles if shares_base(backbone, r)]
    base, empty = _base(backbone, "teacher", meta, [], log)
    views = build_shared(base, params, sharing, chain, log, wrap=lora_on_meta if empty else None)
    raw = {r: views[r] if r in views else _load_role(backbone, params, r, chain, log, meta) for r in roles}
    own = [r for r in roles if r not in views]
    log(f"share_base: teacher{''.join(', ' + r for r in sharing)} share one frozen base"
        + (f"; {', '.join(own)} keep their own" if own else ""))
    return RoleView(base, "teacher", (), trainable=None), raw


def _wrap(teacher, raw, env, dcfg, half, on_cpu, log) -> dict[str, nn.Module]:
    """DDP / FSDP2 wrapping per ``distributed.strategy``; returns the callables per role."""
    nets = dict(raw)
    if dcfg.strategy == "ddp":
        ids = [env.device.index] if env.device.type == "cuda" else None
        for role, net in raw.items():
            if isinstance(net, RoleView):
                nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, net.ddp_ignore())
            nets[role] = _DDP(net, device_ids=ids, find_unused_parameters=True, forward_sync_buffers=False)
    elif dcfg.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mesh = _fsdp_mesh(env, dcfg.fsdp_sharding, log)
        mp = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32) if half is not None else None
        reshard = dcfg.fsdp_sharding != "shard_grad_op"
        frozen = teacher.base if isinstance(teacher, RoleView) else teacher
        trained = {id(n): n for n in (n.base if isinstance(n, RoleView) else n for n in raw.values())}
        for net in trained.values():
            _shard(net, mesh, reshard=reshard, mp=mp, offload=False)
        offload = dcfg.offload_frozen and not on_cpu and id(frozen) not in trained
        if id(frozen) not in trained:
            _shard(frozen, mesh, reshard=True, mp=mp, offload=offload)
        for net in (frozen, *trained.values()):
            if pending(net):  # CPU-offloaded shards live in host memory
                materialize(net, torch.device("cpu") if offload and net is frozen else env.device)
    return nets


def build_roles(backbone, params, env, *, init_uri: str | None = None, roles=TRAINABLE,
                log: Callable[[str], None] = print) -> Roles:
    """Teacher + LoRA roles, wrapped per ``params.distributed`` (see module docstring)."""
    dcfg = params.distributed
    chain, parent = [], {}
    if init_uri:
        from rtdmd.lora.artifact import stack_chain

        chain = stack_chain(init_uri, backbone=params.name)
        parent = {"uri": init_uri, "manifest_sha256": chain[-1].manifest_sha256}
    strategy = dcfg.strategy if env.initialized else "none"
    # fsdp_load=meta (rtdmd.train.sharded_load); rtdmd.plan simulates the files it streams
    meta = strategy == "fsdp" and dcfg.fsdp_load == "meta"
    teacher, raw = _load_roles(backbone, params, roles, chain, log, meta)
    # ``assume_gpu``: a simulated GPU rank (rtdmd.plan) keeps the GPU dtypes on a CPU device
    on_cpu = env.device.type != "cuda" and not env.assume_gpu
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dcfg.mixed_precision)
    if half is not None and on_cpu:
        log(f"note: mixed_precision={dcfg.mixed_precision} falls back to fp32 on CPU")
        half = None
    if dcfg.offload_frozen and (on_cpu or dcfg.strategy != "fsdp"):
        log("note: offload_frozen only applies to FSDP on GPU; ignored")
    elif dcfg.offload_frozen and isinstance(teacher, RoleView) and any(isinstance(n, RoleView) for n in raw.values()):
        log("note: offload_frozen: the teacher shares its base with trainable roles (share_base); nothing to offload")
    if dcfg.strategy != "none" and not env.initialized:
        log(f"note: distributed.strategy={dcfg.strategy} without a process group (not under torchrun): no wrapping")
    nets = _wrap(teacher, raw, env, dcfg, half, on_cpu, log) if strategy != "none" else dict(raw)
    result = Roles(teacher=teacher, nets=nets, raw=raw, parent=parent)
    compile_blocks(result.modules(), dcfg.compile, env.device.type, log)
    if half is not None and strategy != "fsdp":
        def autocast():
            return torch.autocast(env.device.type, dtype=half)
        result.autocast = autocast
    return result
