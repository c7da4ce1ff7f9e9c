r"""Live tensor-storage bytes by phase, counted as the code allocates and frees (no arithmetic).

:class:`MemoryTracker` is a ``TorchDispatchMode``: every tensor an op returns is looked up by its
storage; a storage seen for the first time adds ``nbytes`` to the live total and is kept as a
C++-level weak reference (``StorageWeakRef``); storages whose reference expired are subtracted
whenever a peak would move and at phase switches, so peaks are exact. (A Python
``weakref.finalize`` on the storage object misses frees: FSDP2's sharding drops parameters whose
Python storage wrapper is not the one the tracker saw.) FSDP2 frees and
re-allocates unsharded parameters by resizing their storage in place
(``untyped_storage().resize_``), which no op sees, so :func:`storage_resizes` reports those too.
The peak of the live total is kept per *phase* (``load``, ``rollout``, ``fake_update``,
``generator_update``, ``bp``), as is the FLOP count of each phase, from the formulas of
``torch.utils.flop_counter`` applied op by op. (``FlopCounterMode`` itself is not used: its module
tracker keeps tensors alive — on a tiny cold-start step it raised the generator-turn peak by 58 %.)

Under ``FakeTensorMode`` a tracked "allocation" costs nothing, which is what lets the real
training step run at real model sizes on a CPU. Data-dependent scalars (``.item()``,
``float(loss)``) have no value there; the tracker answers them with ``scalar_value`` (1) so the
code runs on — the simulation's trainer turns off the checks whose outcome would depend on it.

Not counted (the caller's headroom covers them): the CUDA context and kernels' private
workspaces (cuBLAS, flash attention), caching-allocator rounding and fragmentation, NCCL buffers.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

_SCALAR = torch.ops.aten._local_scalar_dense.default
_EXPIRED = torch.UntypedStorage._expired  # what StorageWeakRef.expired calls, without two Python layers


class MemoryTracker(TorchDispatchMode):
    """Live and peak bytes of tensor storages, per phase (see the module docstring)."""

    def __init__(self, fake_mode=None, scalar_value: float = 1.0, collect: bool = False, flops: bool = True):
        super().__init__()
        self.count_flops = flops  # False: memory only (FLOPs of every phase reported as 0)
        self.collect = collect  # gc.collect() at every phase switch (frees cyclic garbage early)
        self.fake_mode = fake_mode
        self.flop_total = 0
        self.scalar_value = scalar_value
        self.live = 0
        self.peak = 0
        self.phase = "load"
        self.peaks: dict[str, int] = {"load": 0}
        self.flops: dict[str, int] = {}
        # storage key -> (weak reference, its raw handle, bytes); the reference owns the handle
        self._sizes: dict[int, tuple[StorageWeakRef, int, int]] = {}
        self._flops_at = 0

    # ---- phases --------------------------------------------------------------------------------
    def _switch(self, name: str) -> None:
        if self.collect:
            gc.collect()
        self._sweep()
        total = self.flop_total
        self.flops[self.phase] = self.flops.get(self.phase, 0) + total - self._flops_at
        self._flops_at = total
        self.phase = name
        self.peaks[name] = max(self.peaks.get(name, 0), self.live)

    @contextlib.contextmanager
    def in_phase(self, name: str) -> Iterator[None]:
        prev = self.phase
        self._switch(name)
        try:
            yield
        finally:
            self._switch(prev)

    def finish(self) -> None:
        """Attribute the FLOPs counted since the last switch to the current phase; sweep."""
        self._switch(self.phase)
        self._sweep()

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _sweep(self) -> None:
        exp = _EXPIRED
        dead = [k for k, (_, w, _) in self._sizes.items() if exp(w)]
        for k in dead:
            self.live -= self._sizes.pop(k)[2]

    def _add(self, delta: int) -> None:
        self.live += delta
        if self.live > self.peak or self.live > self.peaks.get(self.phase, 0):
            self._sweep()  # only when a peak would move: exact peaks, cheap steady state
            self.peak = max(self.peak, self.live)
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.live)

    def _entry(self, st) -> int | None:
        key = st._cdata
        hit = self._sizes.get(key)
        if hit is not None and _EXPIRED(hit[1]):  # address reused by a new storage
            self.live -= self._sizes.pop(key)[2]
            hit = None
        return None if hit is None else key

    def track(self, t: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(t):  # DTensor: its storage is a placeholder of the full
            return  # logical size; the local shard is produced (and tracked) by the ops below it
        if t.is_meta:  # no memory (a model built with empty weights before it is materialised)
            return
        st = t.untyped_storage()
        if self._entry(st) is not None:
            return
        n = int(st.nbytes())
        ref = StorageWeakRef(st)
        self._sizes[st._cdata] = (ref, ref.cdata, n)
        self._add(n)

    def resized(self, st, new_bytes: int) -> None:
        key = self._entry(st)
        old = 0
        if key is not None:
            old = self._sizes[key][2]
        ref = StorageWeakRef(st)
        self._sizes[st._cdata] = (ref, ref.cdata, int(new_bytes))
        self._add(int(new_bytes) - old)

    def _clear_memo(self) -> None:
        # FakeTensorMode memoises converted tensors through weak references; a tensor with a weak
        # reference cannot be swapped, and ``nn.Module.to`` swaps fake parameters (peft moves every
        # adapter with ``.to``). The memo only saves re-conversions, so it is emptied around ops.
        if self.fake_mode is not None:
            memo = self.fake_mode.fake_tensor_converter.meta_converter.tensor_memo
            if len(memo):
                memo.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _SCALAR:
            t = args[0]
            if t.dtype == torch.bool:
                return False
            return int(self.scalar_value) if not t.is_floating_point() else float(self.scalar_value)
        self._clear_memo()
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._clear_memo()
        count = flop_registry.get(func._overloadpacket) if self.count_flops else None
        if count is not None:
            self.flop_total += int(count(*args, **kwargs, out_val=out))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


@contextlib.contextmanager
def storage_resizes(tracker: MemoryTracker) -> Iterator[None]:
    """Report ``UntypedStorage.resize_`` (FSDP2's free / re-allocate of unsharded parameters)."""
    orig = torch.UntypedStorage.resize_

    def resize_(self, size):
        out = orig(self, size)
        tracker.resized(self, int(size))
        return out

    torch.UntypedStorage.resize_ = resize_
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = orig
