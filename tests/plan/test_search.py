"""The smallest-GPU-count search: accepted counts only, binary search, answer checked by simulation."""
import pytest

from rtdmd.config import load_params
from rtdmd.plan.search import candidate_layouts, smallest_fitting


def test_candidates_respect_the_world_size_rules_and_the_node_layout():
    params = load_params("sd3m", ["model.tiny=false"])  # cold start: global batch 72; RL: 32, K = 16, NB = 16
    assert [n * g for n, g in candidate_layouts(params, "cold_start", 8, 72)] == [1, 2, 3, 4, 6, 8, 24, 72]
    assert candidate_layouts(params, "rl", 8, 32) == [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (4, 8)]


def test_binary_search_returns_the_first_fit_and_its_failing_neighbour():
    layouts = [(1, w) for w in (1, 2, 4, 8)] + [(2, 8), (4, 8)]
    seen = []

    def peak_of(n, g):
        seen.append(n * g)
        return 100 // (n * g)  # falls with the GPU count

    found = smallest_fitting(layouts, peak_of, limit=20)  # 100/8 = 12 fits, 100/4 = 25 does not
    assert found["layout"] == (1, 8)
    fits = {p["world"]: p["fits"] for p in found["probes"]}
    assert fits[8] is True and fits[4] is False
    assert len(seen) <= 3  # ⌈log2(6 + 1)⌉
    assert smallest_fitting(layouts, peak_of, limit=1)["layout"] is None



def test_a_lower_bound_is_probed_first_and_counts_below_it_are_not_simulated():
    layouts = [(1, w) for w in (1, 2, 4, 8)] + [(2, 8), (4, 8)]
    seen = []

    def peak_of(n, g):
        seen.append(n * g)
        return 100 // (n * g)

    found = smallest_fitting(layouts, peak_of, limit=20, at_least=8)  # the bound is the answer: one probe
    assert found["layout"] == (1, 8) and seen == [8]
    seen.clear()
    found = smallest_fitting(layouts, peak_of, limit=4, at_least=4)  # 100/32 = 3 fits; 100/16 = 6 does not
    assert found["layout"] == (4, 8) and seen[0] == 4 and min(seen) == 4
    assert {p["world"]: p["fits"] for p in found["probes"]}[16] is False


@pytest.mark.slow
def test_min_gpus_on_a_sized_model_with_a_tight_memory_budget():
    """The search's answer is the smallest accepted count whose simulated peak fits (tiny FLUX.2, fp32)."""
    from unittest import mock

    from rtdmd.plan import simulate as S
    from rtdmd.plan.cli import plan
    from rtdmd.plan.simulate import GiB, simulate
    from rtdmd.plan.validate import FLUX2_VALIDATION, flux2_spec, validation_params

    v = FLUX2_VALIDATION["tiny"]
    spec = flux2_spec(v["heads"], v["head_dim"], v["double"], v["single"])
    params = validation_params(v["resolution"], 8, ["distributed.strategy=fsdp"])
    runs = {}

    def sim(p, stage, nodes=1, gpus_per_node=1, **kw):  # each count simulated once
        key = nodes * gpus_per_node
        if key not in runs:
            runs[key] = simulate(p, stage, nodes=nodes, gpus_per_node=gpus_per_node, spec=spec, flops=False)
        return runs[key]

    peaks = {w: sim(params, "cold_start", gpus_per_node=w)["peak_bytes"] for w in (2, 4)}
    assert peaks[4] < peaks[2]
    budget = (peaks[4] + peaks[2]) / 2 / 0.9 / GiB  # 4 GPUs fit with 10 % headroom, 2 do not
    with mock.patch.object(S, "simulate", sim):
        r = plan(params, "cold_start", 1, 4, gpu_memory=budget, flops=False, min_gpus=True, max_gpus=8)
    assert r["fits"] and r["min_gpus"]["world"] == 4
    assert [n * g for n, g in candidate_layouts(params, "cold_start", 4, 8)] == r["min_gpus"]["candidates"]
    probed = {p["world"]: p["fits"] for p in r["min_gpus"]["probes"]}
    assert probed == {2: False, 4: True}
