"""K-repeat group sampler (algorithm.md §6.1, invariant 22) and the sharded sampler."""
from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from rtdmd.data.samplers import KRepeatSampler, ShardedSampler, check_group_divisibility


def _ranks(world, bs, k, n=100, seed=7, nb=4):
    return [KRepeatSampler(n, bs, k, num_replicas=world, rank=r, seed=seed, num_batches_per_epoch=nb) for r in range(world)]


def _steps(sampler, n):
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("world,bs,k", [(1, 24, 24), (2, 12, 24), (3, 8, 24), (8, 3, 24), (4, 6, 8), (6, 4, 8)])
def test_k_repeat_invariant_22(world, bs, k):
    samplers = _ranks(world, bs, k)
    per_rank = [_steps(s, 6) for s in samplers]
    m = world * bs // k
    for step in range(6):
        batches = [per_rank[r][step] for r in range(world)]
        assert all(len(b) == bs for b in batches)  # every rank gets bs indices
        counts = Counter(i for b in batches for i in b)
        assert len(counts) == m and set(counts.values()) == {k}  # M prompts, each exactly K times
        # every rank computes the same global list
        globals_ = {tuple(s.global_batch(step // 4, step % 4)) for s in samplers}
        assert len(globals_) == 1
        assert sum(batches, []) == list(globals_.pop())


def test_k_repeat_is_world_size_invariant():
    """Same global batch (24) and K: identical groups for 1, 2, 3, 4, 8 processes."""
    ref = [sum(batch, []) for batch in zip(*[_steps(s, 10) for s in _ranks(1, 24, 8)])]
    for world in (2, 3, 4, 8):
        got = [sum(batch, []) for batch in zip(*[_steps(s, 10) for s in _ranks(world, 24 // world, 8)])]
        assert got == ref, world


def test_k_repeat_matches_spec_formula():
    n, world, bs, k, seed, nb = 50, 2, 6, 4, 11, 3
    s = KRepeatSampler(n, bs, k, num_replicas=world, rank=1, seed=seed, num_batches_per_epoch=nb)
    got = _steps(s, 7)
    for it, batch in enumerate(got):
        e, b = divmod(it, nb)
        g = torch.Generator().manual_seed(seed + e * nb + b)
        m = world * bs // k
        idx = torch.randperm(n, generator=g)[:m].repeat_interleave(k)
        full = idx[torch.randperm(m * k, generator=g)].tolist()
        assert batch == full[bs : 2 * bs]
    assert s.epoch == 2 and s.step == 1  # position advanced by the sampler itself
    assert got[0] != got[1]  # no repeated batch without an explicit set_epoch (reference QUIRK fixed)


def test_k_repeat_validation_errors_name_values():
    with pytest.raises(ValueError, match=r"2\*9 = 18 is not divisible by K \(num_image_per_prompt\) = 24"):
        KRepeatSampler(100, 9, 24, num_replicas=2)
    with pytest.raises(ValueError, match="exceed the dataset size 2"):
        KRepeatSampler(2, 12, 4, num_replicas=1)
    with pytest.raises(ValueError, match="rank"):
        KRepeatSampler(100, 12, 4, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="batch_size"):
        KRepeatSampler(100, 0, 4)
    assert check_group_divisibility(8, 9, 24, 16) == 3  # the sd35m geometry of the reference


def test_k_repeat_resume_including_other_world_size():
    full = [sum(b, []) for b in zip(*[_steps(s, 9) for s in _ranks(2, 12, 6, nb=4)])]
    a = _ranks(2, 12, 6, nb=4)
    first = [sum(b, []) for b in zip(*[_steps(s, 5) for s in a])]
    state = a[0].state_dict()
    assert state["epoch"] == 1 and state["step"] == 1
    # resume on 3 processes with the same global batch (3 x 8)
    b = _ranks(3, 8, 6, nb=4)
    for s in b:
        s.load_state_dict(state)
    rest = [sum(x, []) for x in zip(*[_steps(s, 4) for s in b])]
    assert first + rest == full
    with pytest.raises(ValueError, match="global_batch_size"):
        _ranks(1, 6, 6, nb=4)[0].load_state_dict(state)
    c = _ranks(2, 12, 6, nb=4)[0]
    c.set_epoch(1)
    assert (c.epoch, c.step) == (1, 0)


@pytest.mark.parametrize("world,bs", [(1, 8), (2, 4), (4, 2)])
def test_sharded_train_world_size_invariant_and_drop_last(world, bs):
    n = 43
    samplers = [ShardedSampler(n, bs, num_replicas=world, rank=r, seed=3, drop_last=True) for r in range(world)]
    assert all(len(s) == n // 8 for s in samplers)
    for epoch in range(2):
        per_rank = [list(s) for s in samplers]
        steps = [sum(batch, []) for batch in zip(*per_rank)]
        ref = ShardedSampler(n, 8, seed=3).order(epoch)
        assert steps == [ref[i * 8 : (i + 1) * 8] for i in range(n // 8)]  # same global batches for any W
        flat = sum(steps, [])
        assert len(flat) == len(set(flat)) == (n // 8) * 8
    assert all(s.epoch == 2 and s.step == 0 for s in samplers)
    assert ShardedSampler(n, 8, seed=3).order(0) != ShardedSampler(n, 8, seed=3).order(1)  # reshuffled per epoch


@pytest.mark.parametrize("n,world,bs", [(10, 3, 2), (7, 4, 3), (2, 4, 1), (64, 2, 4)])
def test_sharded_eval_covers_everything_once_without_padding(n, world, bs):
    samplers = [ShardedSampler(n, bs, num_replicas=world, rank=r, shuffle=False, drop_last=False) for r in range(world)]
    got = {r: list(s) for r, s in enumerate(samplers)}
    flat = [i for r in got for b in got[r] for i in b]
    assert sorted(flat) == list(range(n))  # every prompt exactly once, no duplicate padding
    assert all(s.num_batches == math.ceil(math.ceil(n / world) / bs) for s in samplers)
    assert all(len(got[r]) <= samplers[r].num_batches for r in got)
    for r in got:  # global index = rank + local_index * world (PNG naming of the reference)
        local = [i for b in got[r] for i in b]
        assert local == [r + j * world for j in range(len(local))]


def test_sharded_resume_mid_epoch_and_state_checks():
    a = ShardedSampler(30, 4, num_replicas=2, rank=1, seed=5)
    full = list(ShardedSampler(30, 4, num_replicas=2, rank=1, seed=5))
    it = iter(a)
    head = [next(it), next(it)]
    state = a.state_dict()
    b = ShardedSampler(30, 4, num_replicas=2, rank=1, seed=5)
    b.load_state_dict(state)
    assert head + list(b) == full
    # consuming exactly the last batch moves the position to the next epoch
    c = ShardedSampler(30, 4, num_replicas=2, rank=1, seed=5)
    c.load_state_dict(state)
    rest = list(itertools.islice(iter(c), len(full) - 2))
    assert rest == full[2:] and (c.epoch, c.step) == (1, 0)
    with pytest.raises(ValueError, match="seed"):
        ShardedSampler(30, 4, num_replicas=2, rank=1, seed=6).load_state_dict(state)
    # train state is world-size invariant for the same global batch
    ShardedSampler(30, 8, num_replicas=1, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="smaller than one global batch"):
        ShardedSampler(5, 4, num_replicas=2)
