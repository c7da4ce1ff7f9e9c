"""Thread-backed test double of :class:`rtdmd.dist.Comm`: ``world`` simulated ranks in one process.

Every collective is an exchange through a shared slot list and a barrier, so a multi-rank
algorithm (gathers, gradient averaging) can be tested without a process group.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

from rtdmd.dist import Comm

__all__ = ["ThreadComm", "run_ranks"]


class ThreadComm(Comm):
    """``world`` simulated ranks as threads of one process (all-gather through a barrier)."""

    def __init__(self, rank: int, world: int, shared: dict):
        self.rank, self.world_size, self.shared = rank, world, shared

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        sh = self.shared
        sh["slots"][self.rank] = t.detach().clone()
        sh["barrier"].wait()
        out = list(sh["slots"])
        sh["barrier"].wait()
        return out

    def all_gather_cat(self, t):
        return torch.cat(self._exchange(t))

    def all_reduce_mean_(self, tensors):
        for t in tensors:
            parts = self._exchange(t)
            t.copy_(torch.stack(parts).mean(0))


def run_ranks(world: int, fn: Callable[[Comm], object]) -> list:
    """Run ``fn(comm)`` for every simulated rank in its own thread; returns the results by rank."""
    shared = {"slots": [None] * world, "barrier": threading.Barrier(world, timeout=120)}
    results: list = [None] * world
    errors: list = []

    def target(r):
        try:
            results[r] = fn(ThreadComm(r, world, shared))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
            shared["barrier"].abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
