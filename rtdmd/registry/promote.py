"""Promotion, rollback and the alias history of ``rtdmd-<backbone>``.

``promote`` moves the ``champion`` alias to a candidate version when every gate passes
(:mod:`rtdmd.registry.gates`, configured by the params' ``registry:`` section) — or with
``force=True`` and a ``reason``. ``rollback`` moves it back to the champion before the current
one. Every move is recorded

* as an entry of the history: registered-model tags ``rtdmd.history.<seq>`` (JSON: seq, time,
  user, host, action, version, previous champion, gate results, reason) — ``history()`` /
  ``rtdmd history`` print them; refused promotions are recorded too (action ``refused``);
* as version tags: the new champion gets ``rtdmd.champion.{since,by,action,previous,reason,gates,event}``,
  the replaced one ``rtdmd.champion.{until,replaced_by}``.

Concurrency: every promotion/rollback runs under a registry-side mutex kept in the registered
model's own tags (:class:`rtdmd.registry.lock.PromotionLock`: Lamport's bakery algorithm over one
``rtdmd.lock.<token>`` tag per contender — MLflow has no compare-and-set, and this needs only its
atomic tag writes and consistent reads; it works across processes and hosts sharing the
registry, and creates no registered model). Inside the lock a promotion re-reads the champion,
evaluates the gates against *it*, moves the alias, appends the history entry and releases the lock.
Guarantees: (1) the alias itself always names exactly one version (MLflow aliases are unique);
(2) promotions/rollbacks are serialised, so each gate decision is made against the champion it
replaces and the history is a linear sequence whose ``previous`` fields chain up; (3) a lock left
by a crashed process is broken after ``registry.lock_ttl_s``. What it does not guarantee: a holder
that stalls past the TTL can be overtaken (the lock is re-checked right before the alias moves,
which narrows but cannot close that window), and moves made outside rtdmd (the MLflow UI) bypass
the lock — ``rollback`` detects a champion that differs from the history and refuses.
"""
from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

from rtdmd.config import load_params
from rtdmd.registry import evaluation as E
from rtdmd.registry.client import ModelRef, connect, error_code, get_version, model_name
from rtdmd.registry.constants import CANDIDATE, CHAMPION, HISTORY_PREFIX
from rtdmd.registry.errors import GateFailure, ModelRefError, NoEvaluationError, RegistryError
from rtdmd.registry.gates import GateReport, GateResult, evaluate_gates
from rtdmd.registry.lock import PromotionLock, current_user, retry
MOVES = ("promote", "force-promote", "rollback")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ----------------------------------------------------------------------------- history
@dataclass
class Move:
    seq: int
    time: str
    user: str
    host: str
    action: str  # promote | force-promote | rollback | refused
    version: str
    previous: str | None
    reason: str
    gates: list[dict]
    gate_summary: str

    @classmethod
    def from_json(cls, text: str) -> "Move":
        d = json.loads(text)
        return cls(seq=int(d["seq"]), time=d["time"], user=d.get("user", ""), host=d.get("host", ""),
                   action=d["action"], version=str(d["version"]), previous=d.get("previous"),
                   reason=d.get("reason", ""), gates=d.get("gates", []), gate_summary=d.get("gate_summary", ""))

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True, separators=(",", ":"))


def history(backbone_or_params: Any = None, *, name: str | None = None, tracking_uri: str | None = None,
            client=None) -> list[Move]:
    """Every recorded move (and refused promotion) of the model, oldest first."""
    name = name or model_name(_load_params(backbone_or_params))
    client = client or connect(tracking_uri)
    from mlflow.exceptions import MlflowException

    try:
        rm = client.get_registered_model(name)
    except MlflowException as exc:
        if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            raise ModelRefError(f"registered model '{name}' does not exist") from None
        raise RegistryError(f"registry error reading {name}: {exc}") from None
    moves = [Move.from_json(v) for k, v in (rm.tags or {}).items() if k.startswith(HISTORY_PREFIX)]
    return sorted(moves, key=lambda m: m.seq)


def champion_stack(moves: Sequence[Move]) -> list[str]:
    """The champion lineage implied by the history (promotions push, rollbacks pop)."""
    stack: list[str] = []
    for m in moves:
        if m.action in ("promote", "force-promote"):
            stack.append(m.version)
        elif m.action == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != m.version:
                stack.append(m.version)
    return stack


def format_history(moves: Sequence[Move], name: str = "") -> str:
    if not moves:
        return f"{name}: no promotions recorded yet" if name else "no promotions recorded yet"
    head = ["#", "time (UTC)", "user", "action", "version", "previous", "gates", "reason"]
    rows = [[str(m.seq), m.time.replace("+00:00", "")[:19].replace("T", " "), m.user, m.action, f"v{m.version}",
             f"v{m.previous}" if m.previous else "-", m.gate_summary.split(";")[0] or "-", m.reason or "-"] for m in moves]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ([f"history of {name}" if name else "history"] +
             ["  ".join(h.ljust(w) for h, w in zip(head, widths))] +
             ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows])
    return "\n".join(line.rstrip() for line in lines)


def _record(client, name: str, *, action: str, version: str, previous: str | None, reason: str, user: str,
            report: GateReport | None) -> Move:
    moves = history(name=name, client=client)
    seq = (moves[-1].seq + 1) if moves else 1
    move = Move(seq=seq, time=_now(), user=user, host=socket.gethostname(), action=action, version=str(version),
                previous=str(previous) if previous else None, reason=reason or "",
                gates=json.loads(report.to_json(limit=60000)) if report else [],
                gate_summary=report.summary()[:2000] if report else "")
    retry(client.set_registered_model_tag, name, f"{HISTORY_PREFIX}{seq:06d}", move.to_json())
    return move


# ----------------------------------------------------------------------------- promote / rollback
@dataclass
class PromotionResult:
    name: str
    version: str
    previous: str | None
    move: Move
    report: GateReport
    forced: bool

    def describe(self) -> str:
        prev = f"v{self.previous}" if self.previous else "none"
        how = "FORCED " if self.forced else ""
        return (f"{how}promoted {self.name} v{self.version} to champion (previous champion: {prev}); gates: "
                f"{self.report.summary()}")


def _load_params(backbone_or_params: Any, overrides: Sequence[str] = ()):
    if hasattr(backbone_or_params, "registry"):
        return backbone_or_params
    if backbone_or_params is None:
        raise RegistryError("give a backbone (e.g. --backbone toy2d) or its params")
    return load_params(str(backbone_or_params), list(overrides))


def _alias_version(client, name: str, alias: str) -> str | None:
    rm = retry(client.get_registered_model, name)
    v = (rm.aliases or {}).get(alias)
    return str(v) if v is not None else None


def _resolve_candidate(client, name: str, version: str | int | None, run: str | None):
    if version is not None and run is not None:
        raise RegistryError("give --version or --run, not both")
    if run:
        hits = [mv for mv in client.search_model_versions(f"name='{name}'")
                if mv.run_id == run or (mv.tags or {}).get("metaflow.run_id") == run
                or (mv.tags or {}).get("rtdmd.logical_run_id") == run]
        if not hits:
            raise ModelRefError(f"no version of '{name}' was registered from run {run}")
        return max(hits, key=lambda mv: int(mv.version))
    if version is not None:
        return get_version(client, ModelRef(f"{name}/{version}", name=name, version=str(version)))
    return get_version(client, ModelRef(f"{name}@{CANDIDATE}", name=name, alias=CANDIDATE))


def _stack_is_cold_start_only(mv) -> bool:
    return (mv.tags or {}).get("rtdmd.stack", "") in ("cold_start",)


def promote(backbone_or_params: Any, *, version: str | int | None = None, run: str | None = None, force: bool = False,
            reason: str | None = None, tracking_uri: str | None = None, user: str | None = None,
            overrides: Sequence[str] = ()) -> PromotionResult:
    """Move ``champion`` to the candidate (``version``, the version registered by ``run``, or the
    ``candidate`` alias) if its gates pass, or if ``force`` with a ``reason``.

    Raises :class:`GateFailure` (names the failing gates), :class:`NoEvaluationError`,
    :class:`ModelRefError`, :class:`LockTimeout` or :class:`RegistryUnreachable`.
    """
    params = _load_params(backbone_or_params, overrides)
    if force and not (reason and reason.strip()):
        raise RegistryError("--force needs --reason '<why the gates are overridden>' (it is recorded)")
    cfg = params.registry
    name = model_name(params)
    user = user or current_user()
    client = connect(tracking_uri)
    cand = _resolve_candidate(client, name, version, run)
    with PromotionLock(client, name, timeout_s=cfg.lock_timeout_s, ttl_s=cfg.lock_ttl_s, user=user,
                       purpose=f"promote v{cand.version}") as lock:
        champ_v = _alias_version(client, name, CHAMPION)
        if champ_v == str(cand.version):
            raise RegistryError(f"{name} v{cand.version} is already the champion")
        cand = retry(client.get_model_version, name, cand.version)  # fresh tags
        cand_eval = E.from_tags(cand.tags or {})
        if cand_eval is None:
            if not force:
                raise NoEvaluationError(
                    f"{name} v{cand.version} has no evaluation recorded, so its gates cannot be checked; evaluate it "
                    f"(rtdmd eval models:/{name}/{cand.version} --record) or promote with --force --reason")
            report = GateReport([GateResult("evaluation", "fail", "no evaluation recorded")], champion_version=champ_v)
        else:
            champ_eval = E.from_tags(retry(client.get_model_version, name, champ_v).tags or {}) if champ_v else None
            report = evaluate_gates(cfg, cand_eval, champ_eval, champion_version=champ_v,
                                    candidate_is_cold_start=_stack_is_cold_start_only(cand))
        if not report.passed and not force:
            _record(client, name, action="refused", version=cand.version, previous=champ_v, reason=reason or "",
                    user=user, report=report)
            retry(client.set_model_version_tag, name, cand.version, "rtdmd.promotion.refused",
                   f"{_now()} failing: {', '.join(r.gate for r in report.failed)}"[:5000])
            raise GateFailure(f"promotion of {name} v{cand.version} refused: failing gate(s) "
                              + "; ".join(f"{r.gate} ({r.detail})" for r in report.failed), report)
        if not lock.still_held():
            raise RegistryError(f"lost the promotion lock of {name} (held past registry.lock_ttl_s?); nothing was moved")
        action = "promote" if report.passed else "force-promote"
        retry(client.set_registered_model_alias, name, CHAMPION, str(cand.version))
        move = _record(client, name, action=action, version=cand.version, previous=champ_v, reason=reason or "",
                       user=user, report=report)
        _tag_move(client, name, move, report)
    return PromotionResult(name=name, version=str(cand.version), previous=champ_v, move=move, report=report,
                           forced=action == "force-promote")


def _tag_move(client, name: str, move: Move, report: GateReport | None) -> None:
    tags = {"rtdmd.champion.since": move.time, "rtdmd.champion.by": move.user, "rtdmd.champion.action": move.action,
            "rtdmd.champion.previous": f"v{move.previous}" if move.previous else "none",
            "rtdmd.champion.reason": move.reason or "-", "rtdmd.champion.event": str(move.seq)}
    if report is not None:
        tags["rtdmd.champion.gates"] = report.to_json(limit=20000)
    for k, v in tags.items():
        retry(client.set_model_version_tag, name, move.version, k, v)
    if move.previous:
        retry(client.set_model_version_tag, name, move.previous, "rtdmd.champion.until", move.time)
        retry(client.set_model_version_tag, name, move.previous, "rtdmd.champion.replaced_by",
               f"v{move.version} ({move.action}, event {move.seq})")


def rollback(backbone_or_params: Any, *, reason: str | None = None, tracking_uri: str | None = None,
             user: str | None = None, overrides: Sequence[str] = ()) -> Move:
    """Restore the champion before the current one (per the recorded history)."""
    params = _load_params(backbone_or_params, overrides)
    cfg = params.registry
    name = model_name(params)
    user = user or current_user()
    client = connect(tracking_uri)
    history(name=name, client=client)  # the model exists (ModelRefError otherwise)
    with PromotionLock(client, name, timeout_s=cfg.lock_timeout_s, ttl_s=cfg.lock_ttl_s, user=user, purpose="rollback"):
        moves = history(name=name, client=client)
        stack = champion_stack(moves)
        current = _alias_version(client, name, CHAMPION)
        if current is None:
            raise RegistryError(f"{name} has no champion to roll back")
        if not stack or stack[-1] != current:
            raise RegistryError(f"the champion alias of {name} points at v{current} but the recorded history says "
                                f"{('v' + stack[-1]) if stack else 'none'} (moved outside rtdmd?); promote explicitly "
                                "with --version ... --force --reason instead")
        if len(stack) < 2:
            raise RegistryError(f"{name} v{current} is the first recorded champion: there is no previous champion to restore")
        target = stack[-2]
        retry(client.set_registered_model_alias, name, CHAMPION, target)
        move = _record(client, name, action="rollback", version=target, previous=current, reason=reason or "",
                       user=user, report=None)
        _tag_move(client, name, move, None)
    return move
