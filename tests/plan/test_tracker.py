"""The storage tracker counts what the code allocates and frees, per phase, exactly."""
import torch

from rtdmd.plan.tracker import MemoryTracker, storage_resizes

MB = 1 << 20


def test_allocations_frees_views_and_phases_are_counted_exactly():
    tr = MemoryTracker()
    with tr:
        a = torch.empty(MB // 4)  # 1 MiB fp32
        v = a[:10]  # a view: same storage, no new bytes
        with tr.in_phase("rollout"):
            b = torch.empty(MB // 2)  # 2 MiB
            del b
        del a
        tr.finish()
        assert tr.live == MB  # the view keeps its storage alive
        m = torch.empty(MB, device="meta")  # a meta tensor (an empty-weights model) holds no memory
        tr.finish()
        assert tr.live == MB
        del m
        del v
        tr.finish()
        assert tr.live == 0
    assert tr.peaks["load"] == MB
    assert tr.peaks["rollout"] == 3 * MB
    assert tr.peak == 3 * MB


def test_storage_resize_is_reported():
    """FSDP2 frees / re-allocates unsharded parameters by resizing their storage in place."""
    tr = MemoryTracker()
    with tr, storage_resizes(tr):
        t = torch.empty(MB // 4)
        t.untyped_storage().resize_(0)
        tr.finish()
        assert tr.live == 0
        t.untyped_storage().resize_(2 * MB)
        tr.finish()
        assert tr.live == 2 * MB
    assert tr.peak == 2 * MB


def test_scalars_of_fake_tensors_get_a_placeholder_value():
    from torch._subclasses.fake_tensor import FakeTensorMode

    fm = FakeTensorMode()
    tr = MemoryTracker(fm)
    with fm, tr:
        x = torch.randn(3)
        assert float(x.sum()) == 1.0
        assert bool(torch.isfinite(x).all()) is False
