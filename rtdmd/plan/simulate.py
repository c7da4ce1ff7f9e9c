r"""Run the project's own training step at real sizes on fake tensors and measure it.

:func:`simulate` runs ``Trainer.setup()`` and one ``train_step()`` (a cold-start iteration that
includes the generator turn, or one RL epoch) of :class:`rtdmd.train.ColdStartTrainer` /
:class:`rtdmd.train.RLTrainer` with

* a fake process group of the requested world size (``torch.distributed`` backend ``fake``), so
  ``build_roles`` takes its real FSDP2 / DDP path and every rank's shard is what rank 0 holds;
* ``FakeTensorMode``: every tensor has its real shape, dtype and storage size but no data;
* the components of :func:`rtdmd.plan.models.spec_for` (published configs) instead of downloads,
  with simulated safetensors files, so ``distributed.fsdp_load: meta`` (build on the meta device,
  shard, stream tensor by tensor) runs its real path;
* :class:`rtdmd.plan.tracker.MemoryTracker` on top (live storage bytes and peak per phase, FLOPs
  per phase by ``torch.utils.flop_counter``'s formulas).

Phases: ``load`` (backbone, roles, sharding, optimizers, EMA, reward models), ``rollout`` (no-grad
sampling; in RL also the decode and scoring of the epoch's images), ``fake_update`` (the
fake-score turn), ``generator_update`` (the generator turn, its differentiable rollout included;
in RL the NB sub-batches' backward calls and the optimizer step), ``bp`` (RL: reward
back-propagation, the decode + differentiable reward chunks inside each aux step), ``other``
(the rest of the step: prompt encoding, advantages, EMA). Peaks are absolute per-GPU bytes (what
is resident + what the phase allocates). The per-step FLOPs of cold start average the generator
turn over ``fake_update_ratio`` iterations; the random stop is simulated at its worst case
``S = K`` (``cold_start.random_stop=false``), so rollout FLOPs are an upper bound. An RL "step"
is one epoch.

What the simulation changes in the trainer (a subclass, nothing else): the non-finite-loss check
is off (fake tensors have no values), prompts are placeholders, and phases are marked around
``rollout`` / ``critic_turn`` / ``generator_turn`` (RL: the engine's ``sample_epoch``, ``score``,
``fake_update``, ``generator_update``, ``_bp_term``). RL only: no ``--init`` artifact (a fresh
LoRA on the base: the merged chain has the same bytes), reward models are the size-faithful
stand-ins of :mod:`rtdmd.plan.rewards`, and the advantages are ones (group statistics need reward
values; with no zero advantage every row is kept, the worst case). DDP: see :func:`simulated_ddp`.
"""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

from rtdmd.dist import DistEnv

GiB = 2 ** 30
PHASES = ("load", "rollout", "fake_update", "generator_update", "bp", "other")


@dataclass
class SimEnv(DistEnv):
    """Rank 0 of a simulated cluster: GPU dtypes (``assume_gpu``) on the fake device."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "fake"
    assume_gpu: bool = True


@contextlib.contextmanager
def fake_world(world: int) -> Iterator[None]:
    """A fake process group of ``world`` ranks (this process is rank 0); collectives do nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised; simulate in a fresh process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def real_device_meshes() -> Iterator[None]:
    """``init_device_mesh`` outside the fake/tracking modes (it computes coordinates from data)."""
    from unittest import mock

    import torch.distributed.device_mesh as dm
    from torch.utils._python_dispatch import _disable_current_modes

    real = dm.init_device_mesh

    def init_device_mesh(*args, **kwargs):
        with _disable_current_modes():
            return real(*args, **kwargs)

    with mock.patch.object(dm, "init_device_mesh", init_device_mesh):
        yield


def _bucket_in_place(state, bucket):
    """DDP comm hook: the bucket as the all-reduce leaves it (in place, same bytes); the fake
    process group's all-reduce completes with no tensor, which DDP's reducer rejects."""
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


@contextlib.contextmanager
def simulated_ddp() -> Iterator[None]:
    """``DistributedDataParallel`` on the fake process group: its real reducer and gradient buckets.

    DDP's construction-time parameter check and broadcast compare and copy values across ranks;
    every fake rank is rank 0, so they are skipped (not counted: the broadcast's transient bucket,
    ≤ ``broadcast_bucket_size`` = 250 MB, freed before training). Each DDP module gets
    :func:`_bucket_in_place` as its comm hook.
    """
    from unittest import mock

    import torch.nn.parallel.distributed as ddp

    real_init = ddp.DistributedDataParallel.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.register_comm_hook(None, _bucket_in_place)

    with mock.patch.object(ddp, "_verify_param_shape_across_processes", lambda *a, **k: None), \
            mock.patch.object(ddp, "_sync_module_states", lambda *a, **k: None), \
            mock.patch.object(ddp.DistributedDataParallel, "__init__", init):
        yield


class _Prompts:
    """Placeholder prompt stream (token values do not affect memory or FLOPs)."""

    def __init__(self, per_rank: int):
        self.per_rank = per_rank

    def next(self) -> list[str]:
        return ["a photo"] * self.per_rank

    def batch_at(self, i: int) -> list[str]:
        return self.next()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _sim_trainer(base, tracker, stage: str):
    from rtdmd.train.base import Trainer
    from rtdmd.train.rl_config import validate_rl_config

    class Simulated(base):
        def check_finite(self, terms):
            # nothing to check (fake tensors have no values); placeholder values where the real
            # check returns the scalar terms' values (Trainer.update reports them as metrics)
            return {n: 0.0 for n in terms} if all(t.dim() == 0 for t in terms.values()) else {}

        def resume(self):
            return None

        if stage == "cold_start":
            def build_data(self):
                return _Prompts(self.cfg.global_batch_size // self.env.world)

            def rollout(self, cond, grad):
                ctx = contextlib.nullcontext() if grad else tracker.in_phase("rollout")
                with ctx:
                    return super().rollout(cond, grad)

            def critic_turn(self, cond, uncond):
                with tracker.in_phase("fake_update"):
                    return super().critic_turn(cond, uncond)

            def generator_turn(self, cond, uncond):
                with tracker.in_phase("generator_update"):
                    return super().generator_turn(cond, uncond)

        if stage == "rl":
            def setup(self):
                # the real setup minus --init (a fresh LoRA on a fresh base: the merged chain costs
                # the same bytes) and the milestone check; the model-free checks still run
                validate_rl_config(self.params, self.env.world)
                self.eval_items = None
                Trainer.setup(self)

            def build_engine(self):
                super().build_engine()
                _phase_rl_engine(self.engine, tracker)

    return Simulated


def _phase_rl_engine(eng, tracker) -> None:
    """Mark the RL engine's phases; advantages on placeholder values (see :func:`simulate`)."""
    def phased(fn, name):
        def run(*a, **kw):
            with tracker.in_phase(name):
                return fn(*a, **kw)
        return run

    sample, score = eng.sample_epoch, eng.score
    eng.sample_epoch = phased(sample, "rollout")
    eng.score = phased(score, "rollout")
    eng.fake_update = phased(eng.fake_update, "fake_update")
    eng.generator_update = phased(eng.generator_update, "generator_update")
    eng._bp_term = phased(eng._bp_term, "bp")

    def advantages(ro, rewards):
        # group statistics need reward values (fake tensors have none); any non-zero advantage keeps
        # every row in the zero-advantage filter, the worst case for the generator update's memory
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            return torch.ones(ro.batch_size), {}

    sub_batches = eng._sub_batches

    def _sub_batches(ro, adv, epoch, ppo_steps):
        # index bookkeeping on the placeholder advantages (real CPU tensors, outside the fake mode)
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            return sub_batches(ro, adv, epoch, ppo_steps)

    eng.advantages = advantages
    eng._sub_batches = _sub_batches


@contextlib.contextmanager
def simulated_rl_inputs(reward_specs: dict | None = None) -> Iterator[None]:
    """Reward stand-ins at their real sizes (:mod:`rtdmd.plan.rewards`) and placeholder RL prompts."""
    from unittest import mock

    from rtdmd.plan.rewards import reward_factory
    from rtdmd.train import rl, rl_core

    def prompts(path, split="train"):
        return [f"prompt {i}" for i in range(1024)]

    with mock.patch.object(rl_core, "build_reward_fn", reward_factory(reward_specs)), \
            mock.patch.object(rl, "load_rl_prompts", prompts):
        yield


@contextlib.contextmanager
def limited_chunks(limit: int) -> Iterator[None]:
    """The RL stage's chunked loops (:func:`rtdmd.train.rl_terms.chunk_slices`: the fake-score
    update's ``rl.fake_score_batch_size`` chunks, the BP decode + reward chunks) run only their
    first ``limit`` chunks, plus the last one when it is smaller.

    Why the peak is unchanged: the chunks of a loop have the same shapes, so each allocates and
    frees the same storages; what accumulates across chunks (the adapters' gradients, the BP
    gradient of x̂0) is allocated by the first backward and added to in place after it, so from the
    second chunk on every chunk repeats the same memory profile. The one exception is the reward
    value each BP chunk keeps for the hinge's value (a float32 per row, held until the sub-batch's
    term is built): a skipped chunk's rows lower the BP peak by 4 bytes each. What changes is the time (the
    number of chunks grows as ``1 / W`` at a fixed global batch) and the FLOPs, which are not
    counted in this mode. Checked against full simulations (tests/plan/test_simulate.py; real
    sizes in bench/runs/).
    """
    from unittest import mock

    from rtdmd.train import rl_terms

    if limit < 1:
        raise ValueError(f"chunk limit {limit} must be ≥ 1")
    real = rl_terms.chunk_slices

    def first_chunks(n: int, size: int) -> list[slice]:
        out = real(n, size)
        if len(out) <= limit:
            return out
        last = out[-1]
        return out[:limit] + ([last] if last.stop - last.start < size else [])

    with mock.patch.object(rl_terms, "chunk_slices", first_chunks):
        yield


def stage_overrides(stage: str) -> list[str]:
    ov = ["model.tiny=false"]
    if stage == "cold_start":
        ov.append("cold_start.random_stop=false")
    return ov


def simulate(params, stage: str, *, nodes: int = 1, gpus_per_node: int = 1, spec: dict | None = None,
             fake: bool = True, collect: bool = False, reward_specs: dict | None = None,
             flops: bool = True, chunk_limit: int | None = None) -> dict[str, Any]:
    """Simulate one step of ``stage`` for ``params`` on ``nodes × gpus_per_node`` ranks.

    ``spec``: the components (default :func:`rtdmd.plan.models.spec_for` of ``params.name``);
    ``fake=False`` runs the same thing for real (CPU, validation). ``collect``: run ``gc.collect()``
    at every phase switch — without it, tensors kept alive only by reference cycles stay resident
    until Python's cyclic collector happens to run, exactly as in a real run of the same code.
    ``reward_specs``: RL reward architectures (default :data:`rtdmd.plan.facts.REWARD_MODELS`).
    ``flops=False``: memory only (no FLOP formulas evaluated; every FLOP count is 0).
    ``chunk_limit``: memory only, RL's chunked loops simulated by their first chunks
    (:func:`limited_chunks`); needs ``flops=False``.
    Returns peaks (bytes) and FLOPs per phase, per GPU.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rtdmd.plan.models import simulated_loading, spec_for
    from rtdmd.plan.tracker import MemoryTracker, storage_resizes
    from rtdmd.train.base import RunOptions
    from rtdmd.train.cold_start import ColdStartTrainer
    from rtdmd.train.rl import RLTrainer
    from rtdmd.train.logging import NullLogger

    world = nodes * gpus_per_node
    params.check_world_size(world, stage)
    if chunk_limit is not None and flops:
        raise ValueError("a chunk limit skips chunks, so FLOPs cannot be counted with it; pass flops=False")
    spec = spec or spec_for(params.name)
    base = {"cold_start": ColdStartTrainer, "rl": RLTrainer}[stage]
    fm = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    tr = MemoryTracker(fm, collect=collect, flops=flops)
    env = SimEnv(world=world, local_world=gpus_per_node, assume_gpu=fake)
    with tempfile.TemporaryDirectory() as out, contextlib.ExitStack() as stack:
        if world > 1:
            stack.enter_context(fake_world(world))
            stack.enter_context(real_device_meshes())
            stack.enter_context(simulated_ddp())
        stack.enter_context(simulated_loading(spec, None if fake else torch.float32))
        if stage == "rl":
            stack.enter_context(simulated_rl_inputs(reward_specs))
            if chunk_limit is not None:
                stack.enter_context(limited_chunks(chunk_limit))
        if fm is not None:
            stack.enter_context(fm)
        stack.enter_context(tr)
        stack.enter_context(storage_resizes(tr))
        trainer = _sim_trainer(base, tr, stage)(params, RunOptions(out=out), env=env, logger=NullLogger())
        trainer.setup()
        tr.finish()
        resident = tr.live
        if stage == "cold_start":
            trainer.step = trainer.cfg.fake_update_ratio - 1  # an iteration with the generator turn
        load_peak = tr.peaks["load"]
        with tr.in_phase("other"):
            trainer.train_step()
            trainer.roles.reshard()
            trainer.after_step()
        tr.finish()
        after_step = tr.live
        del trainer
    return {**_report(params, stage, nodes, gpus_per_node, tr), "resident_after_load": resident,
            "load_peak_at_setup_end": load_peak, "resident_after_step": after_step, "collect": collect,
            "flops_counted": flops, "chunk_limit": chunk_limit}


def _report(params, stage: str, nodes: int, gpn: int, tr) -> dict[str, Any]:
    world = nodes * gpn
    peaks = dict(tr.peaks)
    flops = dict(tr.flops)
    step_flops = sum(v for k, v in flops.items() if k != "load")
    per_step = step_flops
    if stage == "cold_start":
        ratio = params.cold_start.fake_update_ratio
        gen = flops.get("generator_update", 0)
        per_step = step_flops - gen + gen / ratio
    batch = (params.cold_start.global_batch_size if stage == "cold_start" else params.rl.global_sample_batch_size)
    return {"backbone": params.name, "stage": stage, "nodes": nodes, "gpus_per_node": gpn, "world": world,
            "per_gpu_batch": batch // world, "strategy": params.for_stage(stage).distributed.strategy,
            "fsdp_sharding": params.for_stage(stage).distributed.fsdp_sharding,
            "peak_bytes": max(peaks.values()), "peak_by_phase": peaks, "flops_by_phase": flops,
            "flops_per_step_per_gpu": per_step}
