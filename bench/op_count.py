"""Aten ops per training iteration outside the network passes, grouped by call site.

A deterministic, load-independent companion of :mod:`bench.step_floor`: it runs one
warm-up iteration (TTUR cycle for the cold start, epoch for RL, as the step-floor item does),
then counts every aten op dispatched during one more under a ``TorchDispatchMode``.
Each op is classed by the Python stack that issued it — for backward ops, the stack of the
forward op that created the autograd node (anomaly mode records it, NaN checks off):

* ``network`` — inside an ``nn.Module`` call (the passes the floor replays), or a backbone's
  ``encode_prompts`` / ``decode`` / a reward function;
* ``optimizer`` — inside ``torch.optim`` or ``clip_grad_norm_`` (also in the floor);
* otherwise the innermost frame in this repository (``file:line function``): the non-network
  work this tool is for.

Usage: ``python -m bench.op_count [--model toy2d] [--stage cold_start|rl|both] [--top 40]``.
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = str(Path(__file__).resolve().parents[1])
_NET_FUNCS = {"encode_prompts", "decode", "__call__"}
_TB = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _classify(frames: list[tuple[str, int, str]]) -> str:
    """frames innermost first: (filename, line, function)."""
    site = None
    for fn, line, func in frames:
        if fn.endswith("torch/nn/modules/module.py") and func in ("_call_impl", "_wrapped_call_impl"):
            return "network"
        if "/torch/optim/" in fn or fn.endswith("clip_grad.py"):
            return "optimizer"
        if fn.startswith(ROOT) and "/bench/" not in fn and "/site-packages/" not in fn:  # not a venv in the repo
            rel = fn[len(ROOT) + 1:]
            if rel.startswith("rtdmd/rewards/") or (rel.startswith("rtdmd/backbones/") and func in _NET_FUNCS):
                return "network"
            if site is None:
                site = f"{rel}:{line} {func}"
    return site or "other"


def _py_frames() -> list[tuple[str, int, str]]:
    f, out = sys._getframe(2), []
    while f is not None:
        out.append((f.f_code.co_filename, f.f_lineno, f.f_code.co_name))
        f = f.f_back
    return out


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sites: collections.Counter = collections.Counter()
        self.ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self._node_site: dict[int, tuple] = {}  # holds the nodes: ids stay unique

    def _site(self) -> tuple[str, str]:
        node = torch._C._current_autograd_node()
        if node is None:
            return "fwd", _classify(_py_frames())
        hit = self._node_site.get(id(node))
        if hit is None or hit[0] is not node:  # ids of collected wrappers get reused
            tb = node.metadata.get("traceback_", "")
            frames = [(m.group(1), int(m.group(2)), m.group(3)) for m in _TB.finditer(tb if isinstance(tb, str) else "".join(tb))]
            hit = self._node_site[id(node)] = (node, _classify(list(reversed(frames))))
        return "bwd", hit[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind, site = self._site()
        self.sites[(kind, site)] += 1
        self.ops[site][str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count(tr, *, rl: bool) -> OpCounter:
    from bench.setups import loop_step

    cycle = 1 if rl else max(1, int(tr.cfg.fake_update_ratio))

    def step():
        for _ in range(cycle):
            loop_step(tr)

    step()  # warm-up (lazy state, caches)
    c = OpCounter()
    # memoised constants (cps, flux2_klein, the cold start's σ vectors) turn off under any
    # dispatch mode (for fake tensors); this counter runs real tensors, so they stay on, as in a
    # real run
    mods = [m for name, m in list(sys.modules.items())
            if name.startswith("rtdmd.") and hasattr(m, "_get_current_dispatch_mode")]
    saved = [m._get_current_dispatch_mode for m in mods]
    for m in mods:
        m._get_current_dispatch_mode = lambda: None
    try:
        with torch.autograd.set_detect_anomaly(True, check_nan=False), c:
            step()
    finally:
        for m, f in zip(mods, saved):
            m._get_current_dispatch_mode = f
    return c


def summary(c: OpCounter, top: int) -> dict:
    total = sum(c.sites.values())
    by_site: collections.Counter = collections.Counter()
    for (_, site), n in c.sites.items():
        by_site[site] += n
    outside = {s: n for s, n in by_site.items() if s not in ("network", "optimizer")}
    return {"total": total, "network": by_site["network"], "optimizer": by_site["optimizer"],
            "outside": sum(outside.values()),
            "top": sorted(outside.items(), key=lambda kv: -kv[1])[:top]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy2d")
    ap.add_argument("--stage", default="both", choices=["cold_start", "rl", "both"])
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--ops", action="store_true", help="print the aten op names per site")
    a = ap.parse_args(argv)
    from bench import setups
    from bench.common import set_threads

    set_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-opcount-"))
    for stage in (["cold_start", "rl"] if a.stage == "both" else [a.stage]):
        out = work / stage
        tr = (setups.cold_start_trainer(a.model, out) if stage == "cold_start"
              else setups.rl_trainer(a.model, out, work))
        s = summary(count(tr, rl=stage == "rl"), a.top)
        c_ops = None
        print(f"== {a.model} {stage}: total {s['total']} aten ops; network {s['network']}, "
              f"optimizer {s['optimizer']}, outside {s['outside']}")
        for site, n in s["top"]:
            print(f"{n:6d}  {site}")
        if a.ops:
            c_ops = count(tr, rl=stage == "rl").ops
            for site, _ in s["top"]:
                print(f"  {site}: {dict(c_ops[site].most_common(12))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
