"""Resumable, rank-sharded prompt stream for iteration-based training (spec §8.3 prompt loader).

The stream is the concatenation of seeded permutations of the prompt list (epoch ``e`` uses
``torch.Generator(seed + e)``); global batch ``p`` is items ``[p·G, (p+1)·G)`` of that stream
and rank ``r`` takes its ``G/W`` consecutive slice. It is a pure function of ``(seed,
position)``, identical on every rank, never touches the global RNG, and needs no
``drop_last`` (so tiny prompt sets such as toy2d's 3 class names work with large batches).
``state_dict() = {"position": p}``.

Departure: the reference uses a ``DistributedSampler`` over a DataLoader with ``drop_last`` and
fast-forwards ``step % steps_per_epoch`` batches on resume; this stream resumes exactly from
the stored position instead.
"""
from __future__ import annotations

from pathlib import Path

import torch

from rtdmd.config import ConfigError


def read_prompt_list(path: str | Path) -> list[str]:
    """Prompts of a dataset directory (its ``train*`` file, data_and_eval §2) or a prompt file."""
    from rtdmd.data.formats import read_prompts, resolve_prompt_file

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"prompt source {p} does not exist (set cold_start.prompts / rl.prompts, or prepare the data)")
    try:
        records = read_prompts(resolve_prompt_file(p, "train"))
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"cannot read prompts from {p}: {exc}") from None
    texts = [r.text for r in records if r.text]
    if not texts:
        raise ConfigError(f"prompt source {p} holds no prompts")
    return texts


class PromptStream:
    def __init__(self, prompts: list[str], global_batch: int, rank: int, world: int, seed: int):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world}")
        self.prompts = list(prompts)
        self.global_batch = int(global_batch)
        self.local = self.global_batch // world
        self.rank = int(rank)
        self.seed = int(seed)
        self.position = 0
        self._perms: dict[int, list[int]] = {}
        self._gen = torch.Generator()  # re-seeded per epoch

    def _perm(self, epoch: int) -> list[int]:
        """The epoch's permutation (a pure function of seed + epoch), memoised: a global batch
        larger than the prompt list spans many epochs, re-drawn on every step otherwise."""
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) >= 256:
                self._perms.clear()
            self._gen.manual_seed(self.seed + epoch)
            perm = self._perms[epoch] = torch.randperm(len(self.prompts), generator=self._gen).tolist()
        return perm

    def batch_at(self, position: int) -> list[str]:
        n = len(self.prompts)
        start = position * self.global_batch + self.rank * self.local
        stop = start + self.local
        out: list[str] = []
        while start < stop:  # one slice per epoch the batch touches
            e, j = divmod(start, n)
            take = min(n - j, stop - start)
            out += [self.prompts[i] for i in self._perm(e)[j:j + take]]
            start += take
        return out

    def next(self) -> list[str]:
        batch = self.batch_at(self.position)
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
