"""Promotion gates: a candidate's evaluation against the champion's and its own cold-start model's.

Gate names (as printed and recorded)::

    required:<reward>                 the candidate's evaluation has a score for <reward>
    vs_champion:<reward>              candidate - champion   >= registry.min_delta_vs_champion[<reward>]
    vs_cold_start:<reward>            candidate - cold start >= registry.min_delta_vs_cold_start[<reward>]
    held_out_vs_champion:<reward>     held-out reward: candidate >= champion - tolerance
    held_out_vs_cold_start:<reward>   held-out reward: candidate >= cold start - tolerance

A gate is ``pass``, ``fail`` or ``skip`` (nothing to compare with: no champion yet, or the
candidate *is* a cold-start model). Promotion needs no ``fail``. Scores are higher-is-better.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

EPS = 1e-12


@dataclass
class GateResult:
    gate: str
    status: str  # pass | fail | skip
    detail: str
    candidate: float | None = None
    reference: float | None = None
    threshold: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class GateReport:
    results: list[GateResult] = field(default_factory=list)
    champion_version: str | None = None

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def failed(self) -> list[GateResult]:
        return [r for r in self.results if r.status == "fail"]

    def summary(self) -> str:
        n = {s: sum(r.status == s for r in self.results) for s in ("pass", "fail", "skip")}
        head = f"{n['pass']} passed, {n['fail']} failed, {n['skip']} skipped"
        if self.failed:
            head += "; failing: " + "; ".join(f"{r.gate} ({r.detail})" for r in self.failed)
        return head

    def table(self) -> str:
        width = max([len(r.gate) for r in self.results] + [4])
        return "\n".join(f"  {r.status.upper():4s}  {r.gate:{width}s}  {r.detail}" for r in self.results)

    def to_json(self, limit: int = 20000) -> str:
        text = json.dumps([r.to_dict() for r in self.results], sort_keys=True, separators=(",", ":"))
        return text if len(text) <= limit else json.dumps(
            [{"gate": r.gate, "status": r.status} for r in self.results], separators=(",", ":"))[:limit]


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def evaluate_gates(cfg, candidate: Mapping[str, Any], champion: Mapping[str, Any] | None, *,
                   champion_version: str | None, candidate_is_cold_start: bool = False) -> GateReport:
    """Evaluate every gate of ``cfg`` (a :class:`rtdmd.config.schema.RegistryCfg`).

    ``candidate`` / ``champion`` are evaluation records (:mod:`rtdmd.registry.evaluation`);
    ``champion`` is None when there is no champion (then the champion gates are skipped) — but a
    champion *without* an evaluation fails them (nothing to compare against; force or re-evaluate).
    """
    rep = GateReport(champion_version=champion_version)
    cs = candidate["candidate"]["scores"]
    cold = (candidate.get("cold_start") or {}).get("scores") if candidate.get("cold_start") else None
    add = rep.results.append

    for r in cfg.required_rewards:
        if r in cs:
            add(GateResult(f"required:{r}", "pass", f"scored {_f(cs[r])}", candidate=cs[r]))
        else:
            add(GateResult(f"required:{r}", "fail", f"no score in the candidate's evaluation (has: {', '.join(sorted(cs)) or 'none'})"))

    def delta_gates(prefix: str, deltas: Mapping[str, float], ref: Mapping[str, float] | None, ref_name: str,
                    missing_ref: str | None):
        for r, d in deltas.items():
            gate = f"{prefix}:{r}"
            if missing_ref is not None:
                status = "skip" if missing_ref.startswith("skip:") else "fail"
                add(GateResult(gate, status, missing_ref.removeprefix("skip:").strip(), threshold=d))
                continue
            if r not in cs:
                add(GateResult(gate, "fail", "the candidate has no score", threshold=d))
                continue
            if r not in ref:
                add(GateResult(gate, "fail", f"the {ref_name} has no score", candidate=cs[r], threshold=d))
                continue
            diff = cs[r] - ref[r]
            ok = diff >= d - EPS
            add(GateResult(gate, "pass" if ok else "fail",
                           f"candidate {_f(cs[r])} - {ref_name} {_f(ref[r])} = {diff:+.4g} {'>=' if ok else '<'} min delta {d:+.4g}",
                           candidate=cs[r], reference=ref[r], threshold=d))

    if champion_version is None:
        champ_missing = "skip: no champion yet"
        champ_scores = None
    elif champion is None:
        champ_missing = (f"champion v{champion_version} has no evaluation recorded (record one with "
                         f"`rtdmd eval <champion> --record`, or promote with --force --reason)")
        champ_scores = None
    else:
        champ_missing = None
        champ_scores = champion["candidate"]["scores"]
    if candidate_is_cold_start:
        cold_missing = "skip: the candidate is a cold-start model"
    elif cold is None:
        cold_missing = "no evaluation of the candidate's cold-start model recorded"
    else:
        cold_missing = None
    delta_gates("vs_champion", cfg.min_delta_vs_champion, champ_scores, f"champion v{champion_version}", champ_missing)
    delta_gates("vs_cold_start", cfg.min_delta_vs_cold_start, cold, "cold start", cold_missing)

    if cfg.check_held_out:
        for r in candidate.get("held_out_rewards") or []:
            tol = float(cfg.held_out_tolerances.get(r, cfg.held_out_tolerance))
            for prefix, ref, name, missing in (("held_out_vs_champion", champ_scores, f"champion v{champion_version}", champ_missing),
                                               ("held_out_vs_cold_start", cold, "cold start", cold_missing)):
                gate = f"{prefix}:{r}"
                if missing is not None:
                    add(GateResult(gate, "skip" if missing.startswith("skip:") else "fail",
                                   missing.removeprefix("skip:").strip(), threshold=tol))
                    continue
                if r not in cs:
                    add(GateResult(gate, "fail", "held-out reward has no score in the candidate's evaluation"))
                    continue
                if r not in ref:
                    add(GateResult(gate, "skip", f"the {name} has no score for it", candidate=cs[r]))
                    continue
                ok = cs[r] >= ref[r] - tol - EPS
                add(GateResult(gate, "pass" if ok else "fail",
                               f"candidate {_f(cs[r])} vs {name} {_f(ref[r])}: "
                               f"{'within' if ok else 'regressed by more than'} tolerance {tol:.4g}",
                               candidate=cs[r], reference=ref[r], threshold=tol))
    return rep
