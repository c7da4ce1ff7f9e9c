"""The prompt stream is the documented pure function of (seed, position): the concatenation of
per-epoch seeded permutations, global batch p = items [p·G, (p+1)·G), rank r its slice."""
import pytest
import torch

from rtdmd.train.prompts import PromptStream


def _item(prompts, seed, i):
    e, j = divmod(i, len(prompts))
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + e)).tolist()
    return prompts[perm[j]]


@pytest.mark.parametrize("n, global_batch, world", [(3, 128, 1), (3, 192, 2), (7, 4, 2), (50, 8, 4), (5, 5, 1)])
def test_batches_follow_the_stream_definition_and_resume(n, global_batch, world):
    prompts = [f"prompt {i}" for i in range(n)]
    local = global_batch // world
    for rank in range(world):
        ps = PromptStream(prompts, global_batch, rank, world, seed=11)
        for position in (0, 1, 2, 37, 5):
            start = position * global_batch + rank * local
            assert ps.batch_at(position) == [_item(prompts, 11, i) for i in range(start, start + local)]
        resumed = PromptStream(prompts, global_batch, rank, world, seed=11)
        resumed.load_state_dict({"position": 3})
        assert resumed.next() == ps.batch_at(3) and resumed.state_dict() == {"position": 4}
