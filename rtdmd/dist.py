"""The distributed layer every stage and the evaluation matrix share (lowest layer: no rtdmd imports).

* :class:`DistEnv` / :func:`init_distributed` — process-group set-up from the torchrun environment.
* :class:`Comm` — the collective interface the RL engine needs (:class:`LocalComm` single
  process, :class:`TorchComm` over ``torch.distributed``; the thread-backed test double is
  ``rtdmd.testing.comm.ThreadComm``).
* Module-level collectives on the default group (identity without one): :func:`barrier`,
  :func:`broadcast_tensor`, :func:`broadcast_object`, :func:`gather_object`,
  :func:`all_gather_object`, :func:`is_distributed`, :func:`all_reduce_max`, :func:`reduce_mean`; :func:`full_tensor`
  / :func:`shard_like` for FSDP2 DTensors.
* Random streams: :func:`derive_seed` / :func:`derived_generator` — a stream per
  ``(seed, step, rank, purpose)`` tuple, so nothing needs a broadcast or RNG state to re-draw.

* ``init_distributed(params)`` reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun),
  validates every global batch with :meth:`Params.check_world_size` **before** any model is
  loaded, and initialises the process group: ``distributed.backend`` (``auto`` = nccl when
  CUDA is available, else gloo). Without torchrun variables the run is single-process and no
  process group exists; every helper below then degrades to the identity.
* Seeds: ``seed + rank`` for python / numpy / torch (spec §8.2). Training draws do not use
  these process RNGs: both stages draw from :func:`derived_generator` streams keyed by
  ``(purpose, seed, step[, rank])`` — values that must agree across ranks come from a stream
  without the rank, so no broadcast is needed and a resumed step re-draws the same values.
* ``RTDMD_DETERMINISTIC=1`` turns on ``torch.use_deterministic_algorithms`` (the exact-resume
  test sets it; on GPU it also needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8``).
"""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from typing import Any, NoReturn, Sequence

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = "none"
    initialized_here: bool = False
    assume_gpu: bool = False  # a simulated GPU rank (rtdmd.plan): GPU dtypes on a CPU/fake device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def num_nodes(self) -> int:
        return max(1, self.world // max(1, self.local_world))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init_distributed(params=None, stage: str = "cold_start", device: torch.device | str | None = None) -> DistEnv:
    """Read the torchrun environment, check ``stage``'s batch divisibility, init the process group.

    ``device`` defaults to ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; backend
    ``auto`` is nccl for a CUDA device, else gloo. ``initialized_here`` tells the caller whether
    it owns the group (and should :func:`teardown` it)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if params is not None:
        params.check_world_size(world, stage)  # fail fast, before any model is loaded
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    backend, here = "none", False
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        wanted = params.distributed.backend if params is not None else "auto"
        backend = ("nccl" if use_cuda else "gloo") if wanted == "auto" else wanted
        if backend == "nccl" and not use_cuda:
            raise RuntimeError("distributed.backend=nccl needs CUDA; use gloo (or auto) on CPU")
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
            here = True
    if os.environ.get("RTDMD_DETERMINISTIC") == "1":
        torch.use_deterministic_algorithms(True, warn_only=True)
    return DistEnv(rank=rank, world=world, local_rank=local_rank, local_world=local_world,
                   device=device, backend=backend, initialized_here=here)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int | None) -> NoReturn:
    """End a worker process (``python -m rtdmd.train`` / ``rtdmd.eval``) with ``code`` without the
    interpreter's finalization.

    Flushes stdout/stderr and runs the ``atexit`` handlers (MLflow, ``logging``, tqdm), then
    ``os._exit``. What is skipped is the teardown of every loaded module and library, about 1 s
    per process with torch and the model libraries loaded (bench/runs/2026-12-06_orchestration.md), paid
    after the work is done by every rank of every stage. Nothing is lost by skipping it: the
    workers write checkpoints, artifacts and metrics through closed (or flushed-per-row) files,
    and ``main`` has destroyed the process group before returning.
    """
    import atexit
    import contextlib
    import sys

    def flush() -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):  # closed or replaced streams
                stream.flush()

    flush()
    atexit._run_exitfuncs()  # noqa: SLF001 - the handlers os._exit would skip
    flush()  # what the handlers printed
    os._exit(0 if code is None else int(code))


def seed_everything(seed: int, rank: int = 0) -> None:
    """``seed + rank`` for python, numpy and torch (CPU and all CUDA devices)."""
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _on():
        dist.barrier()


def broadcast_tensor(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast of ``t`` from ``src`` (gloo needs CPU tensors; nccl device tensors)."""
    if not _on():
        return t
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        buf = t.cuda()
        dist.broadcast(buf, src)
        t.copy_(buf.to(t.device))
    elif dist.get_backend() != "nccl" and t.device.type != "cpu":
        buf = t.cpu()
        dist.broadcast(buf, src)
        t.copy_(buf.to(t.device))
    else:
        dist.broadcast(t, src)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not _on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    if not _on():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: Any, dst: int = 0) -> list | None:
    """``[obj of rank 0, obj of rank 1, ...]`` on ``dst``, ``None`` elsewhere."""
    if not _on():
        return [obj]
    out: list | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def _reduce_device() -> torch.device:
    if _on() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return _on()


def all_reduce_max(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise max across ranks (used so every rank sees a non-finite loss on any rank)."""
    if not _on():
        return flags
    buf = flags.detach().to(_reduce_device(), torch.float64)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return buf.cpu()


def reduce_mean(metrics: dict[str, float]) -> dict[str, float]:
    """Mean of each metric across ranks (all ranks must pass the same keys)."""
    if not _on() or not metrics:
        return dict(metrics)
    keys = sorted(metrics)
    buf = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, buf.cpu().tolist())}


# ---------------------------------------------------------------------------------- FSDP2 tensors
def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """Gather a DTensor shard into the full tensor (collective); plain tensors pass through."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(ref: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``ref`` (a DTensor shard when ``ref`` is one); every rank holds ``full``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=ref.device if not isinstance(ref, DTensor) else ref.device_mesh.device_type,
                   dtype=ref.dtype)
    if isinstance(ref, DTensor):
        return distribute_tensor(full, ref.device_mesh, ref.placements, src_data_rank=None)
    return full


# --------------------------------------------------------------------------- collective interface
class Comm:
    """The collectives the RL engine uses; ``rank`` / ``world_size`` of this process."""

    rank: int = 0
    world_size: int = 1

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:  # rank-major concatenation
        raise NotImplementedError

    def all_reduce_mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        raise NotImplementedError


class LocalComm(Comm):
    """Single process."""

    def all_gather_cat(self, t):
        return t

    def all_reduce_mean_(self, tensors):
        return None


class TorchComm(Comm):
    """``torch.distributed`` (initialised process group; gloo or nccl)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = torch.device(device)

    def all_gather_cat(self, t):
        if self.world_size == 1:
            return t
        src = t.detach().to(self.device).contiguous()
        out = [torch.empty_like(src) for _ in range(self.world_size)]
        dist.all_gather(out, src)
        return torch.cat(out).to(t.device)

    def all_reduce_mean_(self, tensors):
        if self.world_size == 1:
            return
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(self.world_size)


def comm_for(env: DistEnv) -> Comm:
    """The collective interface of ``env``: :class:`TorchComm` with a process group, else local."""
    return TorchComm(env.device) if env.initialized else LocalComm()


# ---------------------------------------------------------------------------------- random streams
def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings (stable across processes and python versions)."""
    blob = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") & ((1 << 63) - 1)


def derived_generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed` of ``parts``, e.g. ``("fake", seed, step, rank)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))
