"""``rtdmd plan`` input errors: one line naming the value, exit 2, nothing simulated."""
from rtdmd.plan.cli import format_text, main, notes, verdict
from rtdmd.plan.simulate import GiB


def test_unknown_backbone_is_a_one_line_error(capsys):
    assert main(["--backbone", "tiny_flux2", "--stage", "cold_start"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tiny_flux2" in err and "flux2_4b" in err


def test_gpu_count_that_does_not_divide_the_global_batch_is_rejected(capsys):
    assert main(["--backbone", "flux2_4b", "--stage", "cold_start", "--nodes", "1", "--gpus-per-node", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "72" in err and "7" in err


def test_verdict_applies_the_headroom_and_the_time_estimate():
    report = {"backbone": "b", "stage": "cold_start", "nodes": 1, "gpus_per_node": 8, "world": 8,
              "per_gpu_batch": 9, "strategy": "fsdp", "peak_bytes": int(72.5 * GiB),
              "peak_by_phase": {"load": int(72.5 * GiB)}, "flops_by_phase": {},
              "flops_per_step_per_gpu": 2e15}
    r = verdict(report, 80.0, 0.10, 1000.0, 0.5)
    assert r["fits"] is False  # 72.5 GiB > 90 % of 80 GiB
    assert verdict(report, 81.0, 0.10, 1000.0, 0.5)["fits"] is True
    assert r["step_seconds_at_mfu"] == 4.0
    assert "DOES NOT FIT" in format_text(r)


def test_min_gpus_text_names_the_count_and_the_probes():
    report = {"backbone": "b", "stage": "rl", "nodes": 2, "gpus_per_node": 8, "world": 16,
              "per_gpu_batch": 2, "strategy": "fsdp", "peak_bytes": 10 * GiB,
              "peak_by_phase": {"load": 10 * GiB}, "flops_by_phase": {}, "flops_per_step_per_gpu": 0,
              "flops_counted": False,
              "min_gpus": {"world": 4, "layout": (1, 4), "candidates": [1, 2, 4, 8, 16],
                           "probes": [{"world": 4, "peak_bytes": 30 * GiB, "fits": True},
                                      {"world": 2, "peak_bytes": 75 * GiB, "fits": False}]}}
    text = format_text(verdict(report, 80.0, 0.10, 1000.0, 0.5))
    assert "smallest GPU count  4 (1×4)" in text and "2: 75.0 GiB" in text
    assert "FLOPs" not in text  # --no-flops: no FLOP line


def test_max_gpus_below_one_is_rejected(capsys):
    assert main(["--backbone", "flux2_4b", "--stage", "rl", "--min-gpus", "--max-gpus", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-gpus 0" in err


def test_encoder_cpu_offload_is_reported_as_counted_on_the_gpu():
    from rtdmd.config import load_params

    assert notes(load_params("flux2_4b", [])) == []  # the reference layout: encoders on the device
    offload = notes(load_params("flux2_4b", ["model.encoders_device=cpu_offload"]))
    assert len(offload) == 1 and "upper bound" in offload[0]
    report = {"backbone": "b", "stage": "cold_start", "nodes": 1, "gpus_per_node": 8, "world": 8,
              "per_gpu_batch": 9, "strategy": "fsdp", "peak_bytes": GiB, "peak_by_phase": {"load": GiB},
              "flops_by_phase": {}, "flops_per_step_per_gpu": 0, "notes": offload}
    assert "note: model.encoders_device=cpu_offload" in format_text(verdict(report, 80.0, 0.1, 1000.0, 0.5))


def test_chunk_limit_is_refused_where_it_would_do_nothing_or_skip_counted_flops(capsys):
    base = ["--backbone", "flux2_4b", "--stage", "rl"]
    for extra, says in ((["--chunk-limit", "0", "--no-flops"], "--chunk-limit 0"),
                        (["--chunk-limit", "2"], "--no-flops or --min-gpus"),
                        (["--stage", "cold_start", "--chunk-limit", "2", "--no-flops"], "cold_start")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err


def test_chunk_limited_search_says_so():
    report = {"backbone": "b", "stage": "rl", "nodes": 2, "gpus_per_node": 8, "world": 16,
              "per_gpu_batch": 2, "strategy": "fsdp", "peak_bytes": 10 * GiB,
              "peak_by_phase": {"load": 10 * GiB}, "flops_by_phase": {}, "flops_per_step_per_gpu": 0,
              "flops_counted": False, "chunk_limit": 2,
              "min_gpus": {"world": 4, "layout": (1, 4), "candidates": [1, 2, 4, 8, 16], "chunk_limit": 2,
                           "probes": [{"world": 4, "peak_bytes": 30 * GiB, "fits": True}]}}
    text = format_text(verdict(report, 80.0, 0.10, 1000.0, 0.5))
    assert "first 2 chunks" in text and "4: 30.0 GiB; chunk limit 2" in text
