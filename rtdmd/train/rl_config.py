"""Stage-2 configuration checks, reward set-up and prompt items (everything that needs no model).

:func:`validate_rl_config` is the one place the RL settings are checked (batch geometry vs K
and the world size, reward names and domains, BP rewards differentiable, the loss switches —
"nothing to train", ``last_step.loss: dmd`` —, step-selection range and PPO clip range); the
trainer calls it before any model loads and the engine calls it again on construction.
"""
from __future__ import annotations

from typing import Any

from rtdmd.backbones import backbone_domain
from rtdmd.rewards.errors import RewardNotDifferentiableError

__all__ = ["RLConfigError", "BPRewardNotDifferentiableError", "resolve_bp_weights", "build_reward_check",
           "build_reward_fn", "load_rl_prompts", "parse_prompt_items", "validate_rl_config"]


class RLConfigError(ValueError):
    """An RL setting that cannot work (named, with the fix)."""


class BPRewardNotDifferentiableError(RLConfigError, RewardNotDifferentiableError):
    """A non-differentiable reward requested for back-propagation: a config mistake (the CLI
    exits 2) that is also a :class:`rtdmd.rewards.RewardNotDifferentiableError`."""


def resolve_bp_weights(params) -> tuple[dict[str, float], list[str]]:
    """BP reward weights ``{name: w}`` and the training rewards ignored for BP (§7.3).

    ``rl.bp.rewards`` empty: the differentiable subset of ``rl.reward_weights`` (the reference's
    ``bp_use_training_reward_fn``); non-differentiable ones are returned as ignored (they still
    feed the advantages).  ``rl.bp.rewards`` given: every name must exist and be differentiable,
    otherwise a clear error.
    """
    from rtdmd.rewards import UnknownRewardError, list_scorers

    infos = list_scorers()
    rl = params.rl
    valid = ", ".join(infos)
    for name in list(rl.reward_weights) + list(rl.bp.rewards):
        if name not in infos:
            raise UnknownRewardError(f"unknown reward '{name}' in the rl config; valid rewards: {valid}")
    differentiable = [n for n, i in infos.items() if i.differentiable]
    if rl.bp.rewards:
        bad = [n for n in rl.bp.rewards if not infos[n].differentiable]
        if bad:
            raise BPRewardNotDifferentiableError(
                f"rl.bp.rewards requests {bad} for reward back-propagation, but "
                f"{'it is' if len(bad) == 1 else 'they are'} not differentiable (they can only feed the "
                f"advantages via rl.reward_weights); differentiable rewards: {', '.join(differentiable)}"
            )
        return {n: float(w) for n, w in rl.bp.rewards.items() if w != 0}, []
    kept = {n: float(w) for n, w in rl.reward_weights.items() if w != 0 and infos[n].differentiable}
    ignored = [n for n, w in rl.reward_weights.items() if w != 0 and not infos[n].differentiable]
    return kept, ignored


def build_reward_check(weights: dict[str, float], domain: str) -> None:
    """Every reward must exist (the error lists the valid ones) and score ``domain`` inputs."""
    from rtdmd.rewards import UnknownRewardError, list_scorers

    infos = list_scorers()
    unknown = [n for n in weights if n not in infos]
    if unknown:
        raise UnknownRewardError(f"unknown reward(s) {unknown} in the rl config; valid rewards: {', '.join(infos)}")
    wrong = [n for n in weights if infos[n].domain != domain]
    if wrong:
        raise RLConfigError(
            f"rewards {wrong} score '{infos[wrong[0]].domain}' inputs but this backbone produces "
            f"'{domain}'; choose rewards of domain '{domain}': "
            f"{', '.join(n for n, i in infos.items() if i.domain == domain)}"
        )


def build_reward_fn(weights: dict[str, float], *, domain: str, device="cpu", ckpt_dir=None):
    """A :class:`rtdmd.rewards.MultiScorer` whose rewards all live in ``domain``."""
    from rtdmd.rewards import MultiScorer

    build_reward_check(weights, domain)
    return MultiScorer(weights, ckpt_dir=ckpt_dir, device=device)


def load_rl_prompts(path: str, split: str = "train") -> list[Any]:
    """RL prompt items of a dataset directory's ``split`` (or a file): strings, or ``{"prompt", "metadata"}``."""
    from pathlib import Path

    from rtdmd.config import ConfigError
    from rtdmd.data.formats import read_prompts, resolve_prompt_file

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"rl.prompts: {p} does not exist (prepare the data, or point rl.prompts at a prompt file)")
    try:
        records = read_prompts(resolve_prompt_file(p, split, return_metadata=True))
    except (FileNotFoundError, ValueError) as exc:
        hint = " (rl.eval_split: test needs a test split; set rl.eval_split=train to evaluate on the training prompts)" \
            if split == "test" else ""
        raise ConfigError(f"cannot read RL {split} prompts from {p}: {exc}{hint}") from None
    items = [r.item(True) if r.metadata is not None else r.text for r in records if r.text]
    if not items:
        raise ConfigError(f"rl.prompts: {p} holds no prompts")
    return items


def parse_prompt_items(items) -> tuple[list[str], list[dict | None]]:
    """``(texts, metadata)`` of RL prompt items: strings or ``{"prompt"/"text", "metadata"}`` dicts (§12.11)."""
    texts: list[str] = []
    metadata: list[dict | None] = []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
            metadata.append(None)
        elif isinstance(item, dict):
            text = item.get("prompt", item.get("text"))
            if not isinstance(text, str):
                raise RLConfigError(f"prompt item {item!r} has no 'prompt'/'text' string")
            md = item.get("metadata")
            texts.append(text)
            metadata.append(md if isinstance(md, dict) else None)
        else:
            raise RLConfigError(f"prompt items must be strings or dicts, got {type(item).__name__}")
    if not texts:
        raise RLConfigError("the RL prompt set is empty")
    return texts, metadata


def validate_rl_config(params, world_size: int = 1) -> None:
    """Every model-free check of the RL settings (module docstring); raises naming the key."""
    params.check_world_size(world_size, "rl")
    rl = params.rl
    if rl.global_sample_batch_size % rl.num_images_per_prompt:
        raise RLConfigError(f"rl.num_images_per_prompt (K={rl.num_images_per_prompt}) must divide "
                            f"rl.global_sample_batch_size ({rl.global_sample_batch_size})")
    bp, _ = resolve_bp_weights(params)
    domain = backbone_domain(params.model.family)
    build_reward_check(dict(rl.reward_weights), domain)
    if bp:
        build_reward_check(bp, domain)
    if not rl.policy_gradient and rl.last_step.loss == "none" and not (rl.bp.enabled and rl.bp.grad_scale > 0 and bp):
        raise RLConfigError("nothing to train: rl.policy_gradient is false, rl.last_step.loss is 'none' and "
                            "reward back-propagation is off")
    if rl.last_step.loss == "dmd":
        raise RLConfigError("rl.last_step.loss 'dmd' (plain DMD on the last step) is not implemented; "
                            "use 'ac_dmd' (the released objective) or 'none'")
    k = len(params.sampler.step_list)
    ss = rl.step_selection
    if ss.enabled and ss.range_end >= k:
        raise RLConfigError(f"rl.step_selection.range_end={ss.range_end} is outside the {k}-step schedule "
                            f"(steps 0..{k - 1})")
    if rl.clip_range_low <= 0 or rl.clip_range_high <= 0:
        raise RLConfigError(f"rl.clip_range_low/high must be > 0, got {rl.clip_range_low}, {rl.clip_range_high}")
