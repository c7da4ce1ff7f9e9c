"""The evaluation record of a registered version: what the promotion gates compare.

A version's record (version tag ``rtdmd.eval`` as JSON, and ``eval_summary.json`` among its
files) is built from an evaluation matrix (``rtdmd.eval.run_matrix`` / the flow's ``eval_join``)::

    {"schema": 1,
     "candidate":  {"variant": "rtdmd-4",      "scores": {"toy2d_target": 0.81, ...}},
     "cold_start": {"variant": "cold_start-4", "scores": {...}} | null,
     "training_rewards": [...], "held_out_rewards": [...],
     "source": "<matrix URI>", "variants": {"teacher-50": {...}, ...}}

The candidate's row is the variant whose LoRA stack ends with the registered artifact (matched by
manifest sha256), the cold-start row the variant whose stack is exactly the candidate's
cold-start artifact; without artifact information the flow's naming (``rtdmd-<k>``,
``cold_start-<k>``) is used.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from rtdmd.artifacts.store import fetch_dir, is_s3
from rtdmd.registry.constants import EVAL_SCHEMA as SCHEMA
from rtdmd.registry.constants import EVAL_TAG as TAG
from rtdmd.registry.errors import RegistryError


def _numeric(scores: Mapping[str, Any] | None) -> dict[str, float]:
    out = {}
    for k, v in (scores or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[str(k)] = float(v)
    return out


def _load_matrix(uri: str) -> dict | None:
    """``<uri>/matrix.json`` (flow) or ``<uri>/metadata.json`` (``python -m rtdmd.eval``), or None."""

    try:
        base = fetch_dir(uri) if is_s3(uri) else Path(uri)
    except Exception:  # noqa: BLE001 - the summary's scores are still usable
        return None
    for name in ("matrix.json", "metadata.json"):
        p = base / name
        if p.is_file():
            try:
                return json.loads(p.read_text())
            except json.JSONDecodeError:
                return None
    return None


def _stack_shas(entry: Mapping[str, Any]) -> list[str]:
    return [str(a.get("manifest_sha256")) for a in entry.get("artifacts") or [] if a.get("manifest_sha256")]


def build_evaluation(summary: Mapping[str, Any] | None, *, stack_shas: Sequence[str] = (),
                     candidate_variant: str | None = None, cold_start_variant: str | None = None) -> dict | None:
    """Normalise an evaluation summary into the record above (None when there is nothing to record).

    ``summary`` is a record already (has ``candidate``), a matrix summary (``variants`` with
    artifact checksums), or the flow's short summary (``scores`` + ``uri`` of the matrix).
    ``stack_shas`` are the manifest sha256 of the registered stack, oldest first.
    """
    if not summary:
        return None
    if "candidate" in summary:
        cand = summary["candidate"] or {}
        scores = _numeric(cand.get("scores") if "scores" in cand else cand)
        if not scores:
            raise RegistryError("evaluation record has no numeric candidate scores")
        cold = summary.get("cold_start")
        cold_rec = None
        if cold:
            cold_rec = {"variant": cold.get("variant", "cold_start") if isinstance(cold, Mapping) else "cold_start",
                        "scores": _numeric(cold.get("scores") if "scores" in cold else cold)}
        return {"schema": SCHEMA,
                "candidate": {"variant": cand.get("variant", "candidate"), "scores": scores},
                "cold_start": cold_rec,
                "training_rewards": list(summary.get("training_rewards") or []),
                "held_out_rewards": list(summary.get("held_out_rewards") or []),
                "source": summary.get("source"),
                "variants": {k: _numeric(v) for k, v in (summary.get("variants") or {}).items()}}

    variants: dict[str, Mapping[str, Any]] = dict(summary.get("variants") or {})
    if not variants and summary.get("uri"):
        full = _load_matrix(str(summary["uri"]))
        if full:
            variants = dict(full.get("variants") or {})
    scores = {n: _numeric(e.get("scores")) for n, e in variants.items()} if variants else \
        {n: _numeric(s) for n, s in (summary.get("scores") or {}).items()}
    if not scores:
        return None
    shas = [str(s) for s in stack_shas]

    def find(explicit: str | None, want: list[str] | None, prefix: str, require_exact: bool) -> str | None:
        if explicit:
            if explicit not in scores:
                raise RegistryError(f"evaluation has no variant '{explicit}' (variants: {', '.join(scores)})")
            return explicit
        if want and variants:
            for n, e in variants.items():
                got = _stack_shas(e)
                if got and (got == want if require_exact else got[-1] == want[-1]):
                    return n
        named = [n for n in scores if n.startswith(prefix)]
        return named[0] if len(named) == 1 else None

    cand = find(candidate_variant, shas or None, "rtdmd-", False)
    if cand is None and len(shas) == 1:
        cand = find(None, None, "cold_start-", False)
    if cand is None:
        raise RegistryError(f"cannot tell which evaluated variant is the registered model (variants: {', '.join(scores)}); "
                            "pass candidate_variant=")
    cold = None
    if len(shas) > 1 or cold_start_variant:
        cold = find(cold_start_variant, shas[:1] or None, "cold_start-", True)
    if cold == cand:
        cold = None
    return {"schema": SCHEMA,
            "candidate": {"variant": cand, "scores": scores[cand]},
            "cold_start": {"variant": cold, "scores": scores[cold]} if cold else None,
            "training_rewards": list(summary.get("training_rewards") or []),
            "held_out_rewards": list(summary.get("held_out_rewards") or []),
            "source": summary.get("uri") or summary.get("source"),
            "variants": scores}


def tag_value(record: Mapping[str, Any]) -> str:
    """The compact JSON stored in the version tag (without the full ``variants`` table)."""
    small = {k: v for k, v in record.items() if k != "variants"}
    return json.dumps(small, sort_keys=True, separators=(",", ":"))


def from_tags(tags: Mapping[str, str]) -> dict | None:
    raw = (tags or {}).get(TAG)
    if not raw:
        return None
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError:
        raise RegistryError(f"version tag {TAG} is not valid JSON; re-record the evaluation") from None
    return rec if rec.get("candidate", {}).get("scores") else None
