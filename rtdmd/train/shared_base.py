"""One frozen base, several adapters (``distributed.share_base: true``, the default).

Roles whose frozen base weights are identical share ONE base transformer: each trainable role is
a named PEFT adapter on it (adapter name = role name) and the teacher is the base with every
adapter off. A :class:`RoleView` per role is what the trainer sees (``Roles.nets`` / ``Roles.raw``
/ ``Roles.teacher``): its forward activates exactly its adapters on the base
(:func:`rtdmd.lora.adapters.active_adapters`, no ``requires_grad`` flips, restored on exit), so
``v = base(x) + Σ_adapters (α/r)·B A x`` per adapted Linear, as with a separate copy.

Which roles share: a role shares the teacher's base when it loads the same source
(``backbone.role_source(role)``, the diffusers backbones). With ``model.generator_init`` set (e.g.
a generator from another checkpoint) the generator keeps its own base. toy2d declares no role
sources and keeps separate copies (logged): its ``load_transformer`` builds an MLP whose default
init draws from the global RNG before the teacher state is loaded, so loading one copy instead of
three would shift the training RNG stream its proofs and golden traces were recorded with — for
a 20k-parameter model that saves nothing. Stage 2 (``--init``): the separate layout merges each role's stage-1 chain into its
own base copy (§8.1 "merge_before_training"), so the merged bases of generator, fake score and
teacher all differ. Here the chain is instead kept **unmerged**: every stage-1 adapter of a role is
a frozen adapter (``<role>_stage<i>``, its own rank/alpha) on the shared base, active together with
the role's fresh trainable adapter. In exact arithmetic that is the merged function
(``(W + s B A) x = W x + s B (A x)``); in floating point it differs by rounding (the merge rounds
``W + s·BA`` to W's dtype once, bf16 in the paper params) and it costs the extra LoRA matmuls of
the stage-1 adapters. Departure (docs/reference_departures.md).

Parameters: the role's *trainable* adapter only, named as in the separate layout
(``<module>.lora_A.default.weight``) so optimizers, EMA (LoRA-only in both stages), checkpoints and
exported artifacts keep their format; frozen stage-1 adapters are never trained nor saved.
Distribution: FSDP2 shards the one base (with all its adapters); parameters of an adapter that
took no part in a backward have no gradient and FSDP2 skips them. DDP wraps each trainable view,
with every parameter and buffer but the role's adapter on DDP's ignore list, so each DDP reduces
only its role's gradients (``find_unused_parameters=True`` as before). Regional compilation
compiles the base's blocks once; the active-adapter list is Python state on the LoRA layers,
which dynamo guards on, so each block class compiles one graph per adapter set in use (teacher,
generator, fake score: three, inside the default recompile limit of 8) during warm-up and never
again. ``offload_frozen`` has no separate teacher to offload when the teacher shares the base.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from rtdmd.lora import inject_lora, load_lora_state, lora_parameters, reinit_lora
from rtdmd.lora.adapters import active_adapters, checkpoint_func, forget_layers


class RoleView(nn.Module):
    """One role on a shared base: ``forward`` runs the base with exactly ``adapters`` active;
    other attributes (``config``, ``dtype``, ...) are the base's."""

    def __init__(self, base: nn.Module, role: str, adapters: tuple[str, ...], trainable: str | None):
        super().__init__()
        self.base = base
        self.role = role
        self.adapters = adapters
        self.trainable = trainable

    def forward(self, *args, **kwargs):
        with active_adapters(self.base, self.adapters):
            return self.base(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)

    def lora_params(self) -> dict[str, nn.Parameter]:
        """The trainable adapter's parameters under their separate-layout names."""
        if self.trainable is None:
            return {}
        out = {}
        for name, p in lora_parameters(self.base).items():
            for ab in ("A", "B"):
                tag = f".lora_{ab}.{self.trainable}."
                if tag in name:
                    out[name.replace(tag, f".lora_{ab}.default.")] = p
        return out

    def ddp_ignore(self) -> list[str]:
        """Names (relative to this view) of everything DDP must not touch: all but the own adapter."""
        own = {id(p) for p in self.lora_params().values()}
        names = [n for n, p in self.named_parameters(remove_duplicate=False) if id(p) not in own]
        return names + [n for n, _ in self.named_buffers(remove_duplicate=False)]


def _add_role(base: nn.Module, params, role: str, chain, log) -> tuple[str, ...]:
    """Inject the role's frozen stage-1 adapters (if any) and its fresh trainable adapter."""
    lcfg = params.lora
    stages = [art.adapters[role] for art in chain if role in art.adapters]
    names = []
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters: intended
    with torch.random.fork_rng(devices=[]):  # frozen adapters are loaded: keep the RNG stream of the separate layout
        for i, ad in enumerate(stages):
            name = f"{role}_stage{i}"
            inject_lora(base, list(ad.targets), ad.rank, ad.alpha, adapter=name)
            load_lora_state(base, ad.state, adapter=name)
            names.append(name)
    inject_lora(base, list(lcfg.targets), lcfg.rank, lcfg.alpha, init="gaussian" if stages else lcfg.init, adapter=role)
    if stages:
        if lcfg.reinit_after_merge == "reference":
            reinit_lora(base, reinit="reference", adapter=role)
        log(f"{role}: {len(stages)} stage-1 LoRA adapter(s) kept frozen on the shared base, fresh adapter injected")
    return (*names, role)


def shares_base(backbone, role: str) -> bool:
    """Whether ``role`` loads the teacher's base weights (see the module docstring)."""
    source = getattr(backbone, "role_source", None)
    return source is not None and source(role) == source("teacher")


def build_shared(base: nn.Module, params, roles, chain, log, wrap=None) -> dict[str, RoleView]:
    """A view per role in ``roles`` on ``base`` (the frozen teacher transformer), its adapters
    injected; ``wrap(base, inject)`` runs the injection (a meta base: ``sharded_load.lora_on_meta``)."""
    views = {}

    def inject(base):
        for role in roles:
            views[role] = RoleView(base, role, _add_role(base, params, role, chain, log), trainable=role)

    if wrap is not None:
        wrap(base, inject)
    else:
        inject(base)
    forget_layers(base)
    trainable = tuple(f".lora_{ab}.{r}." for r in views for ab in "AB")
    master = torch.bfloat16 if params.lora.master_dtype == "bfloat16" else torch.float32
    for name, p in base.named_parameters():
        own = any(t in name for t in trainable)
        p.requires_grad_(own)
        if own:
            p.data = p.data.to(master)  # lora.master_dtype (§12.1)
    if views and params.distributed.gradient_checkpointing:
        if hasattr(base, "enable_gradient_checkpointing"):
            base.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_func(base))
        else:
            log(f"note: gradient_checkpointing is not supported by {type(base).__name__}; ignored")
    return views
