"""Metadata schemas of the prompt formats (GenEval and GenEval2 jsonl lines), as pure functions.

The functions return human-readable error strings (empty list = valid); the writers in
:mod:`rtdmd.data.formats` refuse invalid rows. The same structure rules as JSON Schemas
(``*_JSON_SCHEMA``) are what :mod:`rtdmd.data.validate` gives great-expectations.

GenEval line: ``{"tag", "include": [{"class", "count", "color"?, "position"?: [relation,
group_index]}], "exclude"?: [{"class", "count"}], "prompt"}``; classes are the 80 COCO names in
detector label order (``assets/coco80.txt``), relations ``left of / right of / above / below``,
``group_index`` points to an *earlier* include entry.

GenEval2 line: ``{"prompt", "atom_count": int, "vqa_list": [[question, answer], ...],
"skills": [one per VQA pair]}`` with ``len(vqa_list) >= atom_count``.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_RELATIONS = ("left of", "right of", "above", "below")
# The ten colours of the GenEval colour classifier (rewards.md §1.8).
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_INCLUDE_KEYS = frozenset({"class", "count", "color", "position"})
GENEVAL_EXCLUDE_KEYS = frozenset({"class", "count"})
GENEVAL_KEYS = frozenset({"tag", "prompt", "include", "exclude"})

GENEVAL2_SKILLS = ("count", "object", "attribute", "position", "verb")
GENEVAL2_KEYS = frozenset({"prompt", "atom_count", "vqa_list", "skills"})
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
GENEVAL2_ANSWERS = ("Yes", "No") + tuple(w for w in NUMBER_WORDS)


# The same structure rules as JSON Schemas, for great-expectations' ExpectColumnValuesToMatchJsonSchema
# (rtdmd.data.validate). Draft 4 on purpose: it does not count 1.0 as an integer (draft 6+ does),
# as the functions below.
_DRAFT4 = "http://json-schema.org/draft-04/schema#"
_INT = {"type": "integer"}
_NON_EMPTY_STR = {"type": "string", "pattern": r"\S"}


def _entry_schema(keys: frozenset[str]) -> dict:
    props = {"class": {"type": "string"}, "count": _INT, "color": {"type": "string"},
             "position": {"type": "array", "minItems": 2, "maxItems": 2, "items": [{"type": "string"}, _INT]}}
    return {"type": "object", "required": ["class", "count"], "additionalProperties": False,
            "properties": {k: v for k, v in props.items() if k in keys}}


GENEVAL_KEYS_JSON_SCHEMA = {"$schema": _DRAFT4, "additionalProperties": False,
                        "properties": {k: {} for k in sorted(GENEVAL_KEYS)}}
GENEVAL_INCLUDE_JSON_SCHEMA = {
    "$schema": _DRAFT4, "type": "object", "required": ["include"],
    "properties": {"include": {"type": "array", "minItems": 1, "items": _entry_schema(GENEVAL_INCLUDE_KEYS)}},
}
GENEVAL_EXCLUDE_JSON_SCHEMA = {
    "$schema": _DRAFT4,
    "properties": {"exclude": {"type": "array", "items": _entry_schema(GENEVAL_EXCLUDE_KEYS)}},
}
GENEVAL2_JSON_SCHEMA = {
    "$schema": _DRAFT4, "type": "object", "required": ["atom_count", "vqa_list", "skills"],
    "additionalProperties": False,
    "properties": {
        "prompt": {}, "atom_count": _INT,
        "vqa_list": {"type": "array", "minItems": 1,
                     "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": [_NON_EMPTY_STR, _NON_EMPTY_STR]}},
        "skills": {"type": "array", "items": {"type": "string"}},
    },
}


@lru_cache(maxsize=1)
def coco80() -> tuple[str, ...]:
    """The 80 COCO class names in detector label order (``rtdmd/data/assets/coco80.txt``)."""
    text = resources.files("rtdmd.data").joinpath("assets/coco80.txt").read_text(encoding="utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != 80 or len(set(names)) != 80:
        raise RuntimeError(f"coco80.txt must hold 80 distinct names, found {len(names)}")
    return names


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def looks_like_geneval(meta: Any) -> bool:
    return isinstance(meta, dict) and bool({"tag", "include", "exclude"} & meta.keys())


def looks_like_geneval2(meta: Any) -> bool:
    return isinstance(meta, dict) and bool({"vqa_list", "atom_count", "skills"} & meta.keys())


def geneval_structure_errors(meta: Any, *, field: str) -> list[str]:
    """Structural errors of ``meta[field]`` (``include`` or ``exclude``): types and keys only.

    Value checks (class in COCO-80, count range, relation set, group index order) are separate
    rules so the report can name them; see :func:`geneval_entries`.
    """
    allowed = GENEVAL_INCLUDE_KEYS if field == "include" else GENEVAL_EXCLUDE_KEYS
    if field not in meta:
        return [] if field == "exclude" else ["missing 'include'"]
    entries = meta[field]
    if not isinstance(entries, list) or (field == "include" and not entries):
        return [f"'{field}' must be a non-empty list of objects, got {_short(entries)}"]
    errors = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            errors.append(f"{field}[{i}] is {type(entry).__name__}, not an object")
            continue
        unknown = sorted(set(entry) - allowed)
        if unknown:
            errors.append(f"{field}[{i}] has unknown key(s) {unknown}")
        if not isinstance(entry.get("class"), str):
            errors.append(f"{field}[{i}].class must be a string, got {_short(entry.get('class'))}")
        if not _is_int(entry.get("count")):
            errors.append(f"{field}[{i}].count must be an integer, got {_short(entry.get('count'))}")
        if "color" in entry and not isinstance(entry["color"], str):
            errors.append(f"{field}[{i}].color must be a string")
        if "position" in entry:
            pos = entry["position"]
            if not (isinstance(pos, list) and len(pos) == 2 and isinstance(pos[0], str) and _is_int(pos[1])):
                errors.append(f"{field}[{i}].position must be [relation, group_index], got {_short(pos)}")
    return errors


def geneval_errors(meta: Any, *, classes: tuple[str, ...] | None = None, max_count: int = 16) -> list[str]:
    """All errors of one GenEval metadata line (used by the writer; validation splits them by rule)."""
    if not isinstance(meta, dict):
        return [f"GenEval line must be an object, got {type(meta).__name__}"]
    classes = classes or coco80()
    errors = []
    unknown = sorted(set(meta) - GENEVAL_KEYS)
    if unknown:
        errors.append(f"unknown key(s) {unknown}")
    if meta.get("tag") not in GENEVAL_TAGS:
        errors.append(f"tag {_short(meta.get('tag'))} not in {list(GENEVAL_TAGS)}")
    if not isinstance(meta.get("prompt"), str) or not meta.get("prompt", "").strip():
        errors.append("'prompt' must be a non-empty string")
    for field in ("include", "exclude"):
        errors += geneval_structure_errors(meta, field=field)
    if errors:
        return errors
    for e in geneval_entries(meta):
        if e["class"] not in classes:
            errors.append(f"{e['field']}[{e['entry_index']}].class {e['class']!r} is not a COCO-80 class")
        if not 1 <= e["count"] <= max_count:
            errors.append(f"{e['field']}[{e['entry_index']}].count {e['count']} outside [1, {max_count}]")
        if e["color"] is not None and e["color"] not in GENEVAL_COLORS:
            errors.append(f"{e['field']}[{e['entry_index']}].color {e['color']!r} not in {list(GENEVAL_COLORS)}")
        if e["relation"] is not None and e["relation"] not in GENEVAL_RELATIONS:
            errors.append(f"{e['field']}[{e['entry_index']}].position relation {e['relation']!r} not allowed")
        if e["group_index"] is not None and not 0 <= e["group_index"] < e["entry_index"]:
            errors.append(
                f"{e['field']}[{e['entry_index']}].position group_index {e['group_index']} "
                "does not point to an earlier include entry"
            )
    return errors


def geneval_entries(meta: dict) -> list[dict]:
    """Flatten include/exclude into rows (only entries that are objects) for per-value rules."""
    rows = []
    for field in ("include", "exclude"):
        entries = meta.get(field)
        if not isinstance(entries, list):
            continue
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                continue
            pos = entry.get("position")
            ok_pos = isinstance(pos, list) and len(pos) == 2
            rows.append(
                {
                    "field": field,
                    "entry_index": i,
                    "class": entry.get("class"),
                    "count": entry.get("count") if _is_int(entry.get("count")) else None,
                    "color": entry.get("color") if isinstance(entry.get("color"), str) else None,
                    "relation": pos[0] if ok_pos and isinstance(pos[0], str) else None,
                    "group_index": pos[1] if ok_pos and _is_int(pos[1]) else None,
                }
            )
    return rows


def geneval2_structure_errors(meta: Any) -> list[str]:
    """Type/shape errors of one GenEval2 line (value rules are separate)."""
    if not isinstance(meta, dict):
        return [f"GenEval2 line must be an object, got {type(meta).__name__}"]
    errors = []
    unknown = sorted(set(meta) - GENEVAL2_KEYS)
    if unknown:
        errors.append(f"unknown key(s) {unknown}")
    if not _is_int(meta.get("atom_count")):
        errors.append(f"atom_count must be an integer, got {_short(meta.get('atom_count'))}")
    vqa = meta.get("vqa_list")
    if not isinstance(vqa, list) or not vqa:
        errors.append(f"vqa_list must be a non-empty list, got {_short(vqa)}")
        vqa = []
    for i, pair in enumerate(vqa):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) and s.strip() for s in pair)):
            errors.append(f"vqa_list[{i}] must be [question, answer] (non-empty strings), got {_short(pair)}")
    skills = meta.get("skills")
    if not isinstance(skills, list) or not all(isinstance(s, str) for s in skills):
        errors.append(f"skills must be a list of strings, got {_short(skills)}")
    elif len(skills) != len(vqa):
        errors.append(f"skills has {len(skills)} entries for {len(vqa)} VQA pairs")
    return errors


def geneval2_errors(
    meta: Any, *, max_atoms: int = 64, answers: tuple[str, ...] | None = GENEVAL2_ANSWERS
) -> list[str]:
    errors = geneval2_structure_errors(meta)
    if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str) or not meta["prompt"].strip():
        errors.append("'prompt' must be a non-empty string")
    if errors:
        return errors
    if not 1 <= meta["atom_count"] <= max_atoms:
        errors.append(f"atom_count {meta['atom_count']} outside [1, {max_atoms}]")
    if len(meta["vqa_list"]) < meta["atom_count"]:
        errors.append(f"len(vqa_list)={len(meta['vqa_list'])} < atom_count={meta['atom_count']}")
    for i, skill in enumerate(meta["skills"]):
        if skill not in GENEVAL2_SKILLS:
            errors.append(f"skills[{i}] {skill!r} not in {list(GENEVAL2_SKILLS)}")
    if answers:
        for i, (_, answer) in enumerate(meta["vqa_list"]):
            if answer not in answers:
                errors.append(f"vqa_list[{i}] answer {answer!r} not in the allowed answers")
    return errors


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
