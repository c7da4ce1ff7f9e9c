"""LoRA on a role's network: injection with checked targets, state dicts, merge and stacking.

Adapters are injected with PEFT (``inject_adapter_in_model``) under the adapter name
``default`` so in-memory keys are ``<module>.lora_A.default.weight`` (spec §9.2). State dicts
exchanged with the rest of the project use the *canonical* form ``<module>.lora_A.weight`` /
``<module>.lora_B.weight`` (no adapter name); files add the diffusers ``transformer.`` prefix.

Reading and writing the adapter goes through PEFT (``get_peft_model_state_dict`` /
``set_peft_model_state_dict``); this module only adds the strict checks the project relies on
(every key known, none missing, shapes equal: a wrong rank or backbone is an error, not a
silently skipped key).

Merging (spec §9.2): ``W += (alpha / r) * B @ A`` in fp32, cast back to W's dtype.
Stacking (spec §8.1 "merge_before_training"): merge the previous stage's adapter into the base
weights, then inject a fresh adapter (B = 0, so the function is unchanged at start).
Deliberate departure (spec §12.2): after a merge the fresh adapter uses the regular PEFT init
(A ~ N(0, 1/r^2)) unless ``reinit="reference"`` asks for the reference's A ~ N(0, 1).
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

ADAPTER = "default"
_KEY = re.compile(r"^(?P<base>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[A-Za-z0-9_]+))?\.weight$")


class LoraError(ValueError):
    """Bad LoRA targets, keys, ranks or files; the message names what and where."""


def _target_matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def matched_modules(net: nn.Module, targets: Iterable[str]) -> dict[str, list[str]]:
    """For each target suffix, the Linear modules it matches (PEFT suffix semantics); a Linear
    that already carries an adapter (PEFT's wrapper with a ``base_layer``) counts as one."""
    names = [n for n, m in net.named_modules()
             if isinstance(m, nn.Linear) or isinstance(getattr(m, "base_layer", None), nn.Linear)]
    return {t: [n for n in names if _target_matches(n, t)] for t in targets}


def inject_lora(net: nn.Module, targets: list[str], rank: int, alpha: float, *, init: str = "gaussian",
                adapter: str = ADAPTER) -> list[str]:
    """Inject a trainable LoRA adapter named ``adapter``; every target must match at least one
    Linear module. Returns the sorted list of adapted module names. Only LoRA A/B (of every
    adapter on ``net``) are left trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    matches = matched_modules(net, targets)
    unmatched = [t for t, found in matches.items() if not found]
    if unmatched:
        raise LoraError(
            f"LoRA targets match no Linear module of {type(net).__name__}: {', '.join(unmatched)} "
            f"(check lora.targets in the params file)"
        )
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
        init_lora_weights=True if init == "kaiming" else "gaussian",
    )
    inject_adapter_in_model(config, net, adapter_name=adapter)
    for name, param in net.named_parameters():
        param.requires_grad_(".lora_" in name)
    return sorted({n for found in matches.values() for n in found})


def lora_parameters(net: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in net.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def canonical_key(key: str) -> str:
    """``a.b.lora_A.default.weight`` / ``module.a.b.lora_A.weight`` -> ``a.b.lora_A.weight``."""
    for prefix in ("module.", "_orig_mod.", "base_model.model.", "transformer."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    m = _KEY.match(key)
    if not m:
        raise LoraError(f"'{key}' is not a LoRA key (expected <module>.lora_A[.<adapter>].weight or lora_B)")
    return f"{m['base']}.lora_{m['ab']}.weight"


def lora_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical LoRA state dict (detached fp32 CPU copies) of the ``default`` adapter, read with
    PEFT's ``get_peft_model_state_dict`` (which drops the adapter name from the keys)."""
    from peft.utils import get_peft_model_state_dict

    if ADAPTER not in getattr(net, "peft_config", {}):
        raise LoraError(f"{type(net).__name__} has no injected LoRA adapter '{ADAPTER}'")
    state = get_peft_model_state_dict(net, adapter_name=ADAPTER, save_embedding_layers=False)
    return {canonical_key(k): v.detach().float().cpu().clone() for k, v in state.items()}


def pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group a canonical state into ``{module: (A, B)}``; incomplete pairs are an error."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _KEY.match(canonical_key(key))
        grouped.setdefault(m["base"], {})[m["ab"]] = value
    out = {}
    for base, ab in grouped.items():
        if set(ab) != {"A", "B"}:
            raise LoraError(f"LoRA module '{base}' has only lora_{''.join(ab)}; both lora_A and lora_B are required")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(f"LoRA module '{base}': lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not form a rank-r pair")
        out[base] = (a, b)
    return out


def state_rank(state: dict[str, torch.Tensor]) -> int:
    ranks = {a.shape[0] for a, _ in pairs(state).values()}
    if len(ranks) != 1:
        raise LoraError(f"LoRA state mixes ranks {sorted(ranks)}")
    return ranks.pop()


def load_lora_state(net: nn.Module, state: dict[str, torch.Tensor], *, adapter: str = ADAPTER) -> None:
    """Copy a canonical state into the injected adapter ``adapter`` with PEFT's
    ``set_peft_model_state_dict``; before that, every key must exist with the same shape (unknown
    keys and rank mismatches are errors, never silently skipped)."""
    from peft.utils import set_peft_model_state_dict

    params = {canonical_key(n): p for n, p in lora_parameters(net).items() if f".{adapter}." in n}
    canon = {canonical_key(k): v for k, v in state.items()}
    unknown = sorted(set(canon) - set(params))
    if unknown:
        raise LoraError(f"LoRA keys not present in the model: {', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}")
    missing = sorted(set(params) - set(canon))
    if missing:
        raise LoraError(f"LoRA file lacks keys the model's adapter has: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    for key, value in canon.items():
        if tuple(params[key].shape) != tuple(value.shape):
            raise LoraError(
                f"LoRA key '{key}' has shape {tuple(value.shape)}, the model expects {tuple(params[key].shape)} "
                "(wrong rank or wrong backbone?)"
            )
    with torch.no_grad():
        result = set_peft_model_state_dict(net, canon, adapter_name=adapter)
    if result.unexpected_keys:  # the checks above make this unreachable unless PEFT renames keys
        raise LoraError(f"PEFT did not place LoRA keys: {', '.join(result.unexpected_keys[:5])}")


def merge_lora_into_base(net: nn.Module, state: dict[str, torch.Tensor], scale: float) -> int:
    """``W += scale * B @ A`` for every pair (fp32 math). Works with or without an injected
    adapter (PEFT wraps the Linear as ``<module>.base_layer``). Returns the merged count."""
    merged = 0
    with torch.no_grad():
        for base, (a, b) in pairs(state).items():
            try:
                module = net.get_submodule(base)
            except AttributeError:
                raise LoraError(f"LoRA module '{base}' does not exist in {type(net).__name__}") from None
            layer = getattr(module, "base_layer", module)
            if not isinstance(layer, nn.Linear):
                raise LoraError(f"LoRA module '{base}' is a {type(layer).__name__}, not a Linear")
            delta = (b.float() @ a.float()) * scale
            w = layer.weight
            if tuple(delta.shape) != tuple(w.shape):
                if tuple(delta.T.shape) == tuple(w.shape):
                    delta = delta.T
                else:
                    raise LoraError(f"LoRA module '{base}': update {tuple(delta.shape)} does not fit weight {tuple(w.shape)}")
            w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
            merged += 1
    if merged == 0:
        raise LoraError("no LoRA pair was merged")
    return merged


def reinit_lora(net: nn.Module, *, reinit: str = "peft", adapter: str | None = None) -> None:
    """Fresh adapter weights: B = 0, A ~ N(0, 1/r^2) ("peft") or N(0, 1) ("reference", §12.2);
    only the adapter named ``adapter`` when given, else every LoRA parameter of ``net``."""
    with torch.no_grad():
        for name, p in lora_parameters(net).items():
            if adapter is not None and f".{adapter}." not in name:
                continue
            if ".lora_B." in name:
                p.zero_()
            else:
                std = 1.0 if reinit == "reference" else 1.0 / p.shape[0]
                p.normal_(0.0, std)


def stack_and_refresh(net: nn.Module, states: list[tuple[dict[str, torch.Tensor], float]],
                      targets: list[str], rank: int, alpha: float, *, reinit: str = "peft") -> list[str]:
    """Merge each ``(state, scale)`` into the base in order, then inject a fresh trainable adapter."""
    for state, scale in states:
        merge_lora_into_base(net, state, scale)
    adapted = inject_lora(net, targets, rank, alpha)
    if reinit == "reference":
        reinit_lora(net, reinit="reference")
    return adapted
