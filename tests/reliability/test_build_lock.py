"""A cache built on first use (the toy2d teacher) by processes that start together — the ranks of
one torchrun, or parallel test workers — is built by one of them; the others wait and read it."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from .helpers import ROOT, child_env, wait_for

_RACER = """
import sys, time
from pathlib import Path
import rtdmd.backbones.toy2d as t
from rtdmd.artifacts.fs import sha256_file

d, log, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
real = t.train_teacher

def counted(cfg):
    with open(log, "a") as f:
        f.write("trained\\n")
    time.sleep(1.0)  # widen the window in which the other process looks for the file
    return real(cfg)

t.train_teacher = counted
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
path = t.ensure_teacher(d, t.TeacherTrainCfg(steps=20, batch_size=64))
t.load_teacher(d)
print(sha256_file(path), flush=True)
"""


def test_toy2d_teacher_is_trained_once_when_two_processes_ask_for_it_at_once(tmp_path):
    d, log, go = tmp_path / "teacher", tmp_path / "trained.log", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(d), str(log), str(go)], cwd=ROOT, env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert log.read_text().splitlines() == ["trained"]  # one process trained, the other waited
    digests = {o[0].strip() for o in outs}
    assert len(digests) == 1 and len(digests.pop()) == 64  # both read the same finished file


def test_build_lock_is_exclusive_and_released_when_its_holder_dies(tmp_path):
    from rtdmd.artifacts.lock import build_lock

    target = tmp_path / "cache"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom rtdmd.artifacts.lock import build_lock\n"
         f"with build_lock({str(target)!r}):\n    print('held', flush=True)\n    time.sleep(600)\n"],
        cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got = []
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        def take():
            with build_lock(target):
                got.append(time.monotonic())

        th = threading.Thread(target=take, daemon=True)
        th.start()
        time.sleep(0.5)
        assert got == []  # waits while the other process holds it
        holder.kill()  # no cleanup by the holder: the kernel drops its lock
        assert wait_for(lambda: bool(got), 30)
    finally:
        holder.kill()
        holder.wait()
    assert not Path(target).exists()  # the lock file is a sibling; the target itself is untouched
