"""Exclusive output locations: one writer per output, and no silent replacement.

:class:`OutputLock` guards an output path (a training ``--out``, a prepared-data directory, an
imported artifact) with a sibling lock file ``.<name>.lock`` created with ``O_CREAT | O_EXCL``.
It holds the owner (user), host, pid, start time and command, so a second writer fails at once
with a message naming the first. The lock is a sibling, not a child, because several outputs are
replaced as a whole by an atomic rename.

Stale locks: a lock whose pid no longer runs on this host is reported (one line on stderr) and
taken over. The holder refreshes the lock's mtime every :data:`HEARTBEAT_S` seconds, so a lock
from another host (a preempted pod whose replacement mounts the same volume) is stale once it has
not been refreshed for :data:`STALE_AFTER_S`; a fresher one is refused with the path to delete. S3 outputs are not locked (no atomic
create-if-absent on every S3-compatible server); the flow runs one writer per stage prefix.

:func:`check_replaceable` is the "nothing existing overwritten without ``--force``" rule: an
output path may be written when it does not exist, is an empty directory, or is something this
command itself produced before (the caller says how to recognise that); anything else needs
``--force``, and the replacement is then done by an atomic rename (``fs.atomic_dir``).

:func:`build_lock` is the other kind: a cache that any process may build on first use (the toy2d
teacher) is built by one process while the others wait for it, then read what it built.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import getpass
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from rtdmd.artifacts.fs import ArtifactError


HEARTBEAT_S = 20.0
STALE_AFTER_S = 120.0


class OutputLockedError(ArtifactError):
    """Another live process owns the output; the message names it."""


class OutputExistsError(ArtifactError):
    """The output path holds something this command did not create; ``--force`` replaces it."""


def lock_path(target: str | os.PathLike) -> Path:
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}.lock"


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return str(os.getuid())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(info: dict) -> str:
    return (f"{info.get('owner', '?')}@{info.get('host', '?')} pid {info.get('pid', '?')} "
            f"since {info.get('started', '?')} ({info.get('command', '?')})")


class OutputLock:
    """``with OutputLock(out, command="rtdmd.train cold_start"):`` — exclusive use of ``out``."""

    def __init__(self, target: str | os.PathLike, *, command: str = "", warn: Callable[[str], None] | None = None):
        self.target = str(target)
        self.path = lock_path(target)
        self.command = command or " ".join(sys.argv[:2])
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.token = uuid.uuid4().hex
        self.held = False
        self._stop = threading.Event()

    def _info(self) -> dict:
        return {"owner": _user(), "host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "command": self.command, "target": self.target}

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._info(), f)
            self.held = True
            threading.Thread(target=self._heartbeat, daemon=True).start()
            return self
        raise OutputLockedError(f"{self.target} is locked ({self.path}) and the lock could not be taken over")

    def _handle_existing(self) -> None:
        info = self._read()
        if info is None:  # a writer between create and write, or an empty file left by a crash
            age = _age_s(self.path)
            if age is not None and age < 5:
                raise OutputLockedError(f"{self.target} is being claimed by another process right now (lock {self.path})")
            self.warn(f"warning: removing unreadable stale lock {self.path}")
        elif info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", -1))):
            self.warn(f"warning: stale lock on {self.target} from {describe(info)}: that process is gone; taking over")
        elif info.get("host") != socket.gethostname() and (_age_s(self.path) or 0) > STALE_AFTER_S:
            self.warn(f"warning: stale lock on {self.target} from {describe(info)}: not refreshed for "
                      f"{_age_s(self.path):.0f}s; taking over")
        elif info.get("host") != socket.gethostname():
            raise OutputLockedError(
                f"{self.target} is in use by {describe(info)}; wait for that run, use another --out, or delete "
                f"{self.path} if it is known to be gone")
        else:
            raise OutputLockedError(
                f"{self.target} is in use by {describe(info)}; wait for it to finish or use another --out")
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self.held:
            info = self._read()
            if info is not None and info.get("token") == self.token:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _age_s(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return None


def check_dir_target(target: str | os.PathLike) -> None:
    """A directory output (a training ``--out``) must not be an existing file or a dangling link."""
    path = Path(target)
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise OutputExistsError(f"--out {path} is an existing file, not a directory; choose another --out")


def check_replaceable(target: str | os.PathLike, *, force: bool, ours: Callable[[Path], bool],
                      what: str = "output") -> None:
    """Refuse to replace ``target`` unless it is absent, an empty dir, ``ours(target)``, or ``force``."""
    path = Path(target)
    if force or not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not path.is_symlink():
        if not any(path.iterdir()) or ours(path):
            return
        raise OutputExistsError(f"--out {path} already exists and is not a {what} written by this command; "
                                "refusing to replace it (pass --force to replace it)")
    raise OutputExistsError(f"--out {path} is an existing {'link' if path.is_symlink() else 'file'}, not a "
                            f"{what}; refusing to replace it (pass --force to replace it)")


@contextlib.contextmanager
def build_lock(target: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``.<name>.build.lock`` next to ``target`` (blocking).

    For caches built on first use by whichever process gets there first (ranks of one torchrun,
    parallel test workers): the caller re-checks for the finished cache after entering, so one
    process builds and the others wait and then read. The kernel drops the lock when its holder
    dies, so a crashed builder leaves nothing to clean up."""
    path = Path(os.path.abspath(target))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.build.lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
