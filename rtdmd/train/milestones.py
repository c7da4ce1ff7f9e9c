"""Milestone artifacts: complete LoRA artifacts published at chosen stage-1 steps.

The reference seeds stage 2 from its stage-1 checkpoint at step 15000 (``generator_ema`` +
``fake_score_net``, §8.1, §10.3), long before stage 1's ``total_steps``. Here the cold start
publishes, besides its final ``<out>/artifact``, one artifact per ``cold_start.milestones`` step
under ``<out>/milestones/step-<N>`` — the same layout, manifest and checksums, with
``"steps": N`` and ``"milestone": N`` in the manifest. A checkpoint is always saved at a
milestone step, so a run killed between the checkpoint and the publication publishes the
milestone when it resumes there. RL's ``rl.init_milestone`` names the step its ``--init``
artifact must come from.
"""
from __future__ import annotations

from rtdmd.artifacts.fs import ArtifactError
from rtdmd.artifacts.store import artifact_exists, join, read_remote_manifest


def milestone_uri(out: str, step: int) -> str:
    return join(out, "milestones", f"step-{int(step)}")


def milestone_published(out: str, step: int) -> bool:
    return artifact_exists(milestone_uri(out, step))


def check_init_milestone(init_uri: str, milestone: int | None) -> None:
    """Refuse an ``--init`` artifact that is not from the configured cold-start milestone."""
    if milestone is None:
        return
    manifest = read_remote_manifest(init_uri)  # checksums are verified when the chain is stacked
    step = manifest.get("milestone", manifest.get("steps"))
    if step != milestone:
        raise ArtifactError(
            f"--init {init_uri} is the cold-start state at step {step}, but rl.init_milestone is {milestone}; "
            f"use <cold-start out>/milestones/step-{milestone} (published when cold_start.milestones lists "
            f"{milestone}) or set rl.init_milestone=null to accept any cold-start artifact")
