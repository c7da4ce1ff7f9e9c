"""Concurrent promotions are serialised by the registry lock: two processes promoting different
candidates at the same moment leave exactly one champion — the one a serial order would give —
and a linear history; a held lock makes a promotion wait (and time out naming the holder); a lock
abandoned by a crashed process is broken after its TTL."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from rtdmd.registry import LockTimeout, history, promote, register_candidate
from rtdmd.registry.client import connect
from rtdmd.registry.constants import CHAMPION
from rtdmd.registry.promote import PromotionLock

from .helpers import ROOT, clean_env, evaluation

WORKER = r"""
import json, os, sys, time
from pathlib import Path
from rtdmd.registry import promote, GateFailure
from rtdmd.registry.client import connect
store, version, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
connect(store).search_registered_models()  # imports + connection done before the start signal
Path(str(go) + f".ready{version}").touch()
while not go.exists():
    time.sleep(0.01)
try:
    res = promote("toy2d", version=version, tracking_uri=store, user=f"worker{version}")
    print(json.dumps({"version": version, "result": "promoted", "previous": res.previous}))
except GateFailure as exc:
    print(json.dumps({"version": version, "result": "refused", "gates": [r.gate for r in exc.report.failed]}))
"""


@pytest.mark.slow
def test_two_concurrent_promotions_leave_exactly_one_champion(store, toy_params, toy_stacks, tmp_path):
    # v1 champion (target 0.5); v2 is the best (0.7); v3 beats v1 (0.6) but not v2.
    # Serial outcomes: v2 then v3 -> v3 refused; v3 then v2 -> v2 promoted over v3. Either way the
    # champion ends as v2. Without serialisation both compare against v1 and v3 can win last.
    for stack, ev in (("a", evaluation(0.5, 0.6, 0.4, 0.5)), ("b", evaluation(0.7, 0.6, 0.4, 0.5)),
                      ("c", evaluation(0.6, 0.6, 0.4, 0.5))):
        register_candidate(artifact_uri=toy_stacks[stack][1], params=toy_params, evaluation=ev, tracking_uri=store)
    promote("toy2d", version=1, tracking_uri=store)
    go = tmp_path / "go"
    env = clean_env(RTDMD_CACHE_DIR=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, store, v, str(go)], cwd=str(ROOT), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in ("2", "3")]
    deadline = time.time() + 300
    while not all((tmp_path / f"go.ready{v}").exists() for v in ("2", "3")):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.touch()  # both start promoting now
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))

    client = connect(store)
    rm = client.get_registered_model("rtdmd-toy2d")
    assert str(rm.aliases[CHAMPION]) == "2", (outs, rm.aliases)  # exactly one champion, the serial answer
    moves = [m for m in history("toy2d", tracking_uri=store) if m.seq > 1]
    assert len(moves) == 2, moves
    first, second = moves
    assert first.previous == "1" and first.action == "promote"  # the first one replaced v1 ...
    if second.action == "promote":  # ... and the second was gated against the *new* champion
        assert (first.version, second.version, second.previous) == ("3", "2", "3")
    else:
        assert (first.version, second.action, second.version, second.previous) == ("2", "refused", "3", "2")
        assert [o for o in outs if o["version"] == "3"][0]["gates"] == ["vs_champion:toy2d_target"]
    assert [m.name for m in client.search_registered_models()] == ["rtdmd-toy2d"]  # no lock model
    assert not [k for k in rm.tags if k.startswith("rtdmd.lock.")], "lock left behind"


def test_held_lock_times_out_naming_the_holder_and_stale_lock_is_broken(store, toy_params, toy_stacks):
    register_candidate(artifact_uri=toy_stacks["a"][1], params=toy_params, evaluation=evaluation(0.5, 0.6, 0.4, 0.5),
                       tracking_uri=store)
    client = connect(store)
    with PromotionLock(client, "rtdmd-toy2d", user="carol", purpose="maintenance"):
        # the lock is not a registered model: the registry lists only the real one, whose tags say who holds it
        assert [m.name for m in client.search_registered_models()] == ["rtdmd-toy2d"]
        (entry,) = [json.loads(v) for k, v in client.get_registered_model("rtdmd-toy2d").tags.items()
                    if k.startswith("rtdmd.lock.")]
        assert entry["holder"].startswith("carol@") and entry["ticket"] == 1 and not entry["choosing"]
        t0 = time.time()
        with pytest.raises(LockTimeout, match="held by carol@"):
            promote("toy2d", tracking_uri=store, overrides=["registry.lock_timeout_s=1.5"])
        assert time.time() - t0 < 30
        assert CHAMPION not in (client.get_registered_model("rtdmd-toy2d").aliases or {})
    # a crashed holder: its lock expired long ago -> broken, the promotion goes through
    stale = PromotionLock(client, "rtdmd-toy2d", ttl_s=0.01, user="crashed")
    stale.acquire()
    time.sleep(0.05)
    res = promote("toy2d", tracking_uri=store, overrides=["registry.lock_timeout_s=20"])
    assert res.version == "1" and not stale.still_held()
    assert not [k for k in client.get_registered_model("rtdmd-toy2d").tags if k.startswith("rtdmd.lock.")]


def test_lock_excludes_concurrent_holders(store, toy_params, toy_stacks):
    """Threads with their own clients contend for the lock: never two inside at once, all get in."""
    register_candidate(artifact_uri=toy_stacks["a"][1], params=toy_params, tracking_uri=store)
    inside, log, errors = [], [], []

    def worker(i: int) -> None:
        try:
            for _ in range(2):
                with PromotionLock(connect(store, check=False), "rtdmd-toy2d", timeout_s=60, user=f"t{i}"):
                    inside.append(i)
                    log.append(len(inside))
                    time.sleep(0.05)
                    inside.remove(i)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(log) == 8 and max(log) == 1, (errors, log)
