"""Prompt samplers with resumable positions.

:class:`KRepeatSampler` — GRPO group sampler (algorithm.md §6.1, data_and_eval.md §3). For
sampling iteration ``b`` of epoch ``e`` every rank builds the same *global* list:
``g = torch.Generator().manual_seed(seed + e·NB + b)``; ``M = W·bs/K`` prompt indices
``randperm(N, g)[:M]``; each repeated ``K`` times consecutively; the ``M·K`` list permuted with
``randperm(M·K, g)``; rank ``r`` takes positions ``[r·bs, (r+1)·bs)``. The list depends only on
the *global* batch ``W·bs`` — never on how it is split over processes — so 1×24, 2×12 and 8×3
give the same groups (invariant 22 of algorithm.md §11), and a run resumed on a different number
of processes with the same global batch continues the same stream.

Reference note: the reference rebuilds its generator from ``seed + epoch`` with the trainer calling
``set_epoch`` before each iteration (its QUIRK: without that call the batch repeats). Here the
sampler owns its position ``(epoch, step)`` and advances it itself; ``seed + e·NB + b`` equals the
reference's seed schedule when its trainer passes the running iteration count as the epoch.

:class:`ShardedSampler` — stage 1 / evaluation batch sampler. Per epoch, a seeded permutation
(``seed + epoch``) or the identity; with ``drop_last`` (training) each global batch is a
consecutive window of ``W·bs`` indices split into contiguous per-rank slices (world-size invariant
like above; the tail shorter than one global batch is dropped); without it (evaluation) rank ``r``
takes ``order[r::W]`` in batches of ``bs`` — no duplicate padding; ``num_batches`` tells every rank
how many steps the longest rank needs so callers can run dummy steps (data_and_eval.md §4.4).

Both have ``state_dict()`` / ``load_state_dict()``; the state is the position of the *next*
batch, so saving after consuming batch ``i`` resumes with batch ``i + 1``.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_group_divisibility(world_size: int, batch_size: int, k: int, num_batches_per_epoch: int = 1) -> int:
    """Validate GRPO batch geometry; returns ``M = W·bs/K`` prompts per sampling iteration."""
    total = world_size * batch_size
    if total % k != 0:
        raise ValueError(
            f"world_size*batch_size = {world_size}*{batch_size} = {total} is not divisible by "
            f"K (num_image_per_prompt) = {k}; pick a per-rank batch so that W*bs % K == 0"
        )
    if (num_batches_per_epoch * total) % k != 0:  # implied by the first check; kept for the message
        raise ValueError(
            f"num_batches_per_epoch*batch_size*world_size = {num_batches_per_epoch}*{batch_size}*{world_size} "
            f"is not divisible by K = {k}"
        )
    return total // k


class KRepeatSampler:
    """Infinite batch sampler yielding this rank's ``batch_size`` indices per sampling iteration."""

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        k: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        num_batches_per_epoch: int = 1,
    ):
        self.dataset_size = _positive_int("dataset_size", dataset_size)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.k = _positive_int("k", k)
        self.num_replicas = _positive_int("num_replicas", num_replicas)
        self.num_batches_per_epoch = _positive_int("num_batches_per_epoch", num_batches_per_epoch)
        if not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank!r}")
        self.rank = rank
        self.seed = int(seed)
        self.m = check_group_divisibility(num_replicas, batch_size, k, num_batches_per_epoch)
        if self.m > dataset_size:
            raise ValueError(
                f"W*bs/K = {self.m} distinct prompts per iteration exceed the dataset size {dataset_size}"
            )
        self.epoch = 0
        self.step = 0  # sampling iteration within the epoch

    @property
    def global_batch_size(self) -> int:
        return self.num_replicas * self.batch_size

    def global_batch(self, epoch: int, step: int) -> list[int]:
        """The ``W·bs`` indices of iteration ``step`` of ``epoch`` (identical on every rank)."""
        g = torch.Generator()
        g.manual_seed(self.seed + epoch * self.num_batches_per_epoch + step)
        chosen = torch.randperm(self.dataset_size, generator=g)[: self.m]
        repeated = chosen.repeat_interleave(self.k)
        perm = torch.randperm(self.m * self.k, generator=g)
        return repeated[perm].tolist()

    def batch(self, epoch: int, step: int) -> list[int]:
        full = self.global_batch(epoch, step)
        return full[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch``."""
        self.epoch, self.step = int(epoch), 0

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            out = self.batch(self.epoch, self.step)
            self.step += 1
            if self.step == self.num_batches_per_epoch:
                self.epoch, self.step = self.epoch + 1, 0
            yield out

    def __len__(self) -> int:
        """Sampling iterations per epoch (the iterator itself is infinite)."""
        return self.num_batches_per_epoch

    def state_dict(self) -> dict:
        return {
            "kind": "k_repeat",
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "dataset_size": self.dataset_size,
            "global_batch_size": self.global_batch_size,
            "k": self.k,
            "num_batches_per_epoch": self.num_batches_per_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; the world size may differ if the global batch is unchanged."""
        mine = self.state_dict()
        for key in ("kind", "seed", "dataset_size", "global_batch_size", "k", "num_batches_per_epoch"):
            if state.get(key) != mine[key]:
                raise ValueError(f"sampler state mismatch on {key!r}: saved {state.get(key)!r}, current {mine[key]!r}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


class ShardedSampler:
    """Epoch-based batch sampler for stage 1 (``drop_last=True``) and evaluation (``False``)."""

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ):
        self.dataset_size = _positive_int("dataset_size", dataset_size)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.num_replicas = _positive_int("num_replicas", num_replicas)
        if not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank!r}")
        self.rank = rank
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        if drop_last and dataset_size < self.global_batch_size:
            raise ValueError(
                f"dataset_size {dataset_size} is smaller than one global batch "
                f"(world_size*batch_size = {num_replicas}*{batch_size} = {self.global_batch_size}) with drop_last"
            )
        self.epoch = 0
        self.step = 0

    @property
    def global_batch_size(self) -> int:
        return self.num_replicas * self.batch_size

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_size))
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_size, generator=g).tolist()

    @property
    def num_batches(self) -> int:
        """Batches per epoch every rank must step through (the longest rank's count for eval)."""
        if self.drop_last:
            return self.dataset_size // self.global_batch_size
        per_rank = math.ceil(self.dataset_size / self.num_replicas)
        return math.ceil(per_rank / self.batch_size)

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's real batches of ``epoch`` (eval: may be fewer than ``num_batches``)."""
        order = self.order(epoch)
        if self.drop_last:
            g, bs, r = self.global_batch_size, self.batch_size, self.rank
            return [order[s * g + r * bs : s * g + (r + 1) * bs] for s in range(self.num_batches)]
        shard = order[self.rank :: self.num_replicas]
        return [shard[i : i + self.batch_size] for i in range(0, len(shard), self.batch_size)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.step = int(epoch), 0

    def __iter__(self) -> Iterator[list[int]]:
        """Remaining batches of the current epoch; after the last one the position is the next epoch."""
        batches = self.rank_batches(self.epoch)
        if self.step >= len(batches):  # nothing left (or an empty eval shard): start the next epoch
            self.epoch, self.step = self.epoch + 1, 0
            batches = self.rank_batches(self.epoch)
        epoch = self.epoch
        while self.epoch == epoch and self.step < len(batches):
            out = batches[self.step]
            self.step += 1
            if self.step == len(batches):
                self.epoch, self.step = epoch + 1, 0
            yield out

    def __len__(self) -> int:
        return len(self.rank_batches(self.epoch)) if not self.drop_last else self.num_batches

    def state_dict(self) -> dict:
        return {
            "kind": "sharded",
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "dataset_size": self.dataset_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "global_batch_size": self.global_batch_size,
            # eval shards (r::W) depend on the world size itself
            "num_replicas": self.num_replicas if not self.drop_last else None,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("kind", "seed", "dataset_size", "shuffle", "drop_last", "global_batch_size", "num_replicas"):
            if state.get(key) != mine[key]:
                raise ValueError(f"sampler state mismatch on {key!r}: saved {state.get(key)!r}, current {mine[key]!r}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
