"""Phase 1 of the GPU check: the machine, the library versions, API probes and the matmul peak.

The peak (the MFU denominator) is measured, not taken from a datasheet: ``n×n @ n×n`` on random
data (never zeros: they run faster), 3 warm-ups, then 10 products each timed with CUDA events;
the median gives ``2n³ / t``. On the GPU the warm-up lasts at least 1 s (the SM clock ramps up
from idle). On the GPU ``n = 8192`` in bf16; in the dry run ``n = 256`` fp32 on CPU
(wall clock), which only exercises the code.
"""
from __future__ import annotations

import importlib.metadata as md
import inspect
import shutil
import statistics
import subprocess
import time
from typing import Any

LIBS = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "numpy",
        "huggingface-hub", "importlib-metadata", "pyyaml", "pillow")


def versions() -> dict[str, str | None]:
    out = {}
    for name in LIBS:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def api_probes() -> dict[str, bool]:
    """Do the torch APIs the trainer calls exist in this torch (a different version on the GPU box)?"""
    import torch

    probes: dict[str, bool] = {}
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard  # noqa: F401

        probes["fsdp2 fully_shard/MixedPrecisionPolicy/CPUOffloadPolicy"] = True
    except ImportError:
        probes["fsdp2 fully_shard/MixedPrecisionPolicy/CPUOffloadPolicy"] = False
    sig = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__)
    probes["DDP forward_sync_buffers (used by rtdmd.train.roles for strategy=ddp)"] = "forward_sync_buffers" in sig.parameters
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor  # noqa: F401

        probes["torch.distributed.tensor DTensor"] = True
    except ImportError:
        probes["torch.distributed.tensor DTensor"] = False
    try:
        import diffusers  # noqa: F401

        probes["import diffusers"] = True
    except Exception:
        probes["import diffusers"] = False
    return probes


def matmul_peak(dry: bool) -> dict[str, Any]:
    import torch

    if dry or not torch.cuda.is_available():
        n, dtype, dev = 256, torch.float32, "cpu"
    else:
        n, dtype, dev = 8192, torch.bfloat16, "cuda"
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t0 = time.perf_counter()
    warm = 0
    while warm < 3 or (dev == "cuda" and time.perf_counter() - t0 < 1.0):  # GPU: ≥ 1 s, clocks ramp up from idle
        a @ b
        if dev == "cuda":
            torch.cuda.synchronize()
        warm += 1
    times = []
    for _ in range(10):
        if dev == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    del a, b
    if dev == "cuda":
        torch.cuda.empty_cache()
    return {"peak_tflops": 2 * n ** 3 / med / 1e12, "peak_what": f"{n}³ {str(dtype).split('.')[-1]} matmul on {dev}",
            "peak_samples_tflops": [round(2 * n ** 3 / t / 1e12, 2) for t in times]}


def nvidia_smi() -> dict[str, str]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {}
    try:
        res = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (subprocess.TimeoutExpired, OSError):
        return {}
    first = (res.stdout.strip().splitlines() or [""])[0]
    parts = [p.strip() for p in first.split(",")]
    keys = ("smi_name", "smi_memory", "driver", "max_sm_clock")
    return dict(zip(keys, parts)) if len(parts) == 4 else {"smi": first}


def _nccl_version() -> str | None:
    import torch

    try:
        v = torch.cuda.nccl.version()
    except Exception:
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def environment(dry: bool) -> dict[str, Any]:
    import platform

    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                           "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   compute_capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                   bf16_supported=torch.cuda.is_bf16_supported(), nccl=_nccl_version())
        env.update(nvidia_smi())
    env["versions"] = versions()
    env["api"] = api_probes()
    env.update(matmul_peak(dry))
    return env
