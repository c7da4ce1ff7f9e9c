"""The promotion lock of ``rtdmd-<backbone>``: a mutex kept in the registered model's own tags.

MLflow offers no compare-and-set on tags or aliases, so the lock is Lamport's bakery algorithm,
which needs only atomic reads and writes of per-process registers: each contender owns one
registered-model tag ``rtdmd.lock.<token>`` (JSON: ``ticket``, ``choosing``, ``holder``,
``expires``). To acquire, a contender

1. writes ``choosing: true`` (the doorway), reads every tag, takes ``ticket = 1 + max(tickets)``
   and writes it with ``choosing: false``;
2. re-reads the tags until no other live contender is choosing or holds a smaller
   ``(ticket, token)`` — then it holds the lock; releasing deletes its tag.

Why it is correct across processes and hosts sharing the registry: every tag write is a committed
transaction before it returns, and ``get_registered_model`` reads all tags of the model in one
query (a consistent snapshot). If A holds the lock, any B that finished its doorway before A's
last read is behind A in ticket order (B saw A choosing, or A's ticket when it took its own, or
A saw B's smaller ticket and would have waited); any B that started its doorway after A's read saw
A's ticket and took a larger one. So two contenders never both pass step 2, and tickets are served
first come, first served (no starvation). Distinct contenders never write the same tag, so the
upsert semantics of MLflow tags cost nothing.

Crashes: every entry carries an expiry (``registry.lock_ttl_s`` after its last write; a waiting
contender refreshes its own). An expired entry is ignored and deleted by the next contender, so a
crashed holder or a contender that died in the doorway blocks others for at most the TTL. As
before, a holder that stalls past the TTL can be overtaken: :meth:`PromotionLock.still_held` is
re-checked right before the alias moves, which narrows but cannot close that window. A contender
whose own entry was deleted as stale while it waited starts over with a new ticket.

Unlike the former lock (a dummy registered model ``<name>--promotion-lock``), nothing appears in
``search_registered_models()``; while a promotion runs the model's page shows who holds it.
"""
from __future__ import annotations

import getpass
import json
import os
import random
import socket
import time
import uuid

from rtdmd.registry.client import error_code
from rtdmd.registry.errors import LockTimeout, RegistryError

PREFIX = "rtdmd.lock."  # registered-model tag of one contender: rtdmd.lock.<token>


def current_user() -> str:
    try:
        return os.environ.get("RTDMD_USER") or getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "unknown"


def transient(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text or "deadlock" in text


def retry(fn, *args, attempts: int = 20, **kwargs):
    """Retry sqlite 'database is locked' errors (several processes writing one sqlite store)."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            if not transient(exc) or i == attempts - 1:
                raise
            time.sleep(0.05 + random.random() * 0.2)


class PromotionLock:
    """Registry-side mutex (see the module docstring): ``with PromotionLock(client, name, ...):``."""

    def __init__(self, client, name: str, *, timeout_s: float = 120.0, ttl_s: float = 900.0, user: str | None = None,
                 purpose: str = "promotion"):
        self.client, self.model = client, name
        self.token = uuid.uuid4().hex
        self.key = f"{PREFIX}{self.token}"
        self.timeout_s, self.ttl_s = float(timeout_s), float(ttl_s)
        self.holder = f"{user or current_user()}@{socket.gethostname()} pid {os.getpid()} ({purpose})"
        self.ticket = 0
        self.held = False
        self._written = 0.0

    # -- registers
    def _write(self, ticket: int, choosing: bool) -> None:
        self._written = time.time()
        value = {"ticket": ticket, "choosing": choosing, "holder": self.holder,
                 "expires": round(self._written + self.ttl_s, 3)}
        retry(self.client.set_registered_model_tag, self.model, self.key, json.dumps(value, sort_keys=True))

    def _entries(self) -> dict[str, dict]:
        """Every contender's entry (one consistent read); unreadable entries count as expired."""
        from mlflow.exceptions import MlflowException

        try:
            rm = retry(self.client.get_registered_model, self.model)
        except MlflowException as exc:
            raise RegistryError(f"cannot read the promotion lock of {self.model}: {exc}") from None
        out = {}
        for k, v in (rm.tags or {}).items():
            if k.startswith(PREFIX):
                try:
                    e = json.loads(v)
                    out[k] = {"ticket": int(e["ticket"]), "choosing": bool(e["choosing"]),
                              "holder": str(e.get("holder", "unknown")), "expires": float(e["expires"])}
                except (ValueError, KeyError, TypeError):
                    out[k] = {"ticket": 0, "choosing": False, "holder": "unknown", "expires": 0.0}
        return out

    def _delete(self, key: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            retry(self.client.delete_registered_model_tag, self.model, key)
        except MlflowException as exc:
            if error_code(exc) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise

    def _doorway(self) -> None:
        self._write(0, True)
        others = [e["ticket"] for k, e in self._entries().items() if k != self.key]
        self.ticket = 1 + max(others, default=0)
        self._write(self.ticket, False)

    # -- lock
    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        self._doorway()
        while True:
            entries = self._entries()
            if self.key not in entries:  # deleted as stale while we waited: take a new ticket
                self._doorway()
                continue
            now = time.time()
            for k in [k for k, e in entries.items() if k != self.key and e["expires"] < now]:
                self._delete(k)  # a crashed holder or contender: broken after its TTL
            live = {k: e for k, e in entries.items() if k != self.key and e["expires"] >= now}
            mine = (self.ticket, self.key)
            ahead = [e for k, e in live.items() if e["choosing"] or (e["ticket"] and (e["ticket"], k) < mine)]
            if not ahead:
                self.held = True
                return
            if time.monotonic() > deadline:
                self._delete(self.key)
                first = min(ahead, key=lambda e: (e["choosing"], e["ticket"]))
                raise LockTimeout(f"promotion lock of {self.model} is held by {first['holder']}; gave up after "
                                  f"{self.timeout_s:g}s (registry.lock_timeout_s). A lock older than "
                                  f"registry.lock_ttl_s={self.ttl_s:g}s is broken automatically.")
            if now - self._written > self.ttl_s / 3:
                self._write(self.ticket, False)  # still waiting: keep our entry from expiring
            time.sleep(0.05 + random.random() * 0.15)

    def still_held(self) -> bool:
        e = self._entries().get(self.key)
        return bool(self.held and e is not None and e["ticket"] == self.ticket and e["expires"] >= time.time())

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        from mlflow.exceptions import MlflowException

        try:
            e = self._entries().get(self.key)
            if e is not None and e["ticket"] == self.ticket:
                self._delete(self.key)
        except (MlflowException, RegistryError):
            pass

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
