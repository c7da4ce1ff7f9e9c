"""Process-group setup from the torchrun environment, seeding and cross-rank helpers.

* ``init_distributed(params)`` reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun),
  validates every global batch with :meth:`Params.check_world_size` **before** any model is
  loaded, and initialises the process group: ``distributed.backend`` (``auto`` = nccl when
  CUDA is available, else gloo). Without torchrun variables the run is single-process and no
  process group exists; every helper below then degrades to the identity.
* Seeds: ``seed + rank`` for python / numpy / torch (spec §8.2). Cross-rank scalars that must
  agree (random stop index, teacher CFG scale, stage-1 τ and δ) are drawn on rank 0 from its
  own RNG stream and broadcast (:func:`broadcast_tensor`).
* ``RTDMD_DETERMINISTIC=1`` turns on ``torch.use_deterministic_algorithms`` (the exact-resume
  test sets it; on GPU it also needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8``).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

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


def init_distributed(params=None, stage: str = "cold_start") -> DistEnv:
    """Read the torchrun environment, check ``stage``'s batch divisibility, init the process group."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if params is not None:
        params.check_world_size(world, stage)  # fail fast, before any model is loaded
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = "none"
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        wanted = params.distributed.backend if params is not None else "auto"
        backend = ("nccl" if use_cuda else "gloo") if wanted == "auto" else wanted
        if backend == "nccl" and not use_cuda:
            raise RuntimeError("distributed.backend=nccl needs CUDA; use gloo (or auto) on CPU")
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
    if os.environ.get("RTDMD_DETERMINISTIC") == "1":
        torch.use_deterministic_algorithms(True, warn_only=True)
    return DistEnv(rank=rank, world=world, local_rank=local_rank, local_world=local_world,
                   device=device, backend=backend)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


def _reduce_device() -> torch.device:
    if _on() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
