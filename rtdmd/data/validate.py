"""Great-expectations validation of prompt rows before anything is published or trained on.

Rows (one dict per prompt, see :func:`rtdmd.data.prepare.collect`) are turned into a few pandas
frames — prompts, source files, GenEval lines, GenEval include/exclude entries, GenEval2 lines,
GenEval2 VQA pairs — stacked into one dataframe with a ``frame`` column. The rules are one stored
expectation suite ``rtdmd_prompts`` (each expectation has the row condition ``frame == <its
frame>`` and its rule name in ``meta``), run by the stored Checkpoint ``rtdmd_prompts`` whose
``UpdateDataDocsAction`` renders the result as Data Docs HTML. With ``gx_dir`` (the prep stage
passes ``<out>.gx`` next to the prepared data) the GX project lives there on disk and keeps one
Data Docs page per run; without it the same checkpoint runs in an in-memory context.

The structure of GenEval/GenEval2 metadata is checked by ``ExpectColumnValuesToMatchJsonSchema``
on the line's JSON (draft 4: ``1.0`` is not an integer, as in :mod:`rtdmd.data.schema`).
``prompt.parseable`` stays a derived column (the reader's parse error must be null): a line
that is not JSON never becomes a row whose values GX could check.

==============================  ============================================================
rule                            expectation
==============================  ============================================================
source.non_empty_file           every ingested file yields >= 1 prompt
prompt.parseable                the line parsed (valid JSON, an object or a string)
prompt.not_null                 text is present
prompt.non_empty                text is not empty after normalisation
prompt.length_bounds            min_chars <= len(text) <= max_chars (per dataset)
prompt.valid_utf8               no undecodable bytes (kept as surrogate escapes by the reader)
prompt.no_control_chars         no C0/C1 control characters (NUL included)
id.not_null / id.unique         stable ids present and unique within dataset/split
geneval.keys                    only tag/prompt/include/exclude
geneval.tag_in_set              tag is one of the six GenEval tags
geneval.include_well_formed     include: non-empty list of {class:str, count:int, color?, position?}
geneval.exclude_well_formed     exclude: list of {class:str, count:int}
geneval.class_in_coco80         every include/exclude class is a COCO-80 name
geneval.count_in_range          1 <= count <= geneval_max_count
geneval.color_in_set            colour is one of the ten classifier colours
geneval.relation_in_set         relation in left of / right of / above / below
geneval.group_index_earlier     0 <= group_index < the entry's own index
geneval2.structure              vqa_list pairs of strings, int atom_count, skills per pair
geneval2.atom_count_in_range    1 <= atom_count <= geneval2_max_atoms
geneval2.vqa_covers_atoms       len(vqa_list) >= atom_count
geneval2.skill_in_set           skills from count/object/attribute/position/verb
geneval2.answer_in_set          answers from the configured set (Yes/No/one..ten by default)
==============================  ============================================================

On failure :func:`validate_rows` writes ``<stem>.json`` and ``<stem>.md`` (rule, expectation,
failing row count, example rows with source file and line, the Data Docs page) and raises
:class:`DataValidationError` carrying the report path.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from rtdmd.data import schema
from rtdmd.data.params import DataParams

# Undecodable bytes are kept by the non-strict reader as lone surrogates (surrogateescape); pandas'
# Arrow strings cannot hold those, so the frame shows each as U+FFFD, which this rule rejects
# (U+FFFD in a source is itself the trace of an earlier failed decode). Reports show the bytes.
INVALID_UTF8 = "\ufffd"
_SURR = re.compile(r"[\ud800-\udfff]")
CONTROL = r"[\x00-\x1f\x7f-\x9f]"
_MISSING = "<missing>"


class DataValidationError(RuntimeError):
    """Prompt data failed validation; ``report_path`` is the JSON report (a .md sits next to it)."""

    def __init__(self, message: str, report_path: Path, failures: list[dict], data_docs: Path | None = None):
        super().__init__(message)
        self.report_path = Path(report_path)
        self.failures = failures
        self.data_docs = data_docs


@dataclasses.dataclass
class ValidationOutcome:
    passed: bool
    report: dict
    report_path: Path | None = None
    data_docs: Path | None = None  # index.html of the GX Data Docs site (with ``gx_dir``)


# ----------------------------------------------------------------------------- frames
def _frames(rows: list[dict], files: list[dict], params: DataParams) -> dict[str, Any]:
    import pandas as pd

    prompts, geneval, entries, geneval2, pairs = [], [], [], [], []
    for r in rows:
        idx = r["row"]
        text = r.get("text")
        prompts.append(
            {"row": idx, "text": _SURR.sub(INVALID_UTF8, text) if isinstance(text, str) else text, "id": r.get("id"), "key": f"{r['dataset']}/{r['split']}/{r.get('id')}",
             "parse_error": r.get("parse_error"), "dataset": r["dataset"]}
        )
        meta = r.get("metadata")
        if r.get("kind") == "geneval" and r.get("parse_error") is None:
            tag = meta.get("tag", _MISSING) if isinstance(meta, dict) else _MISSING
            geneval.append({"row": idx, "tag": tag if isinstance(tag, str) else repr(tag), "metadata": _json(meta)})
            for e in schema.geneval_entries(meta if isinstance(meta, dict) else {}):
                e = dict(e)
                e["row"] = idx
                e["class"] = e["class"] if isinstance(e["class"], str) else None
                entries.append(e)
        elif r.get("kind") == "geneval2" and r.get("parse_error") is None:
            meta = meta if isinstance(meta, dict) else {}
            vqa = meta.get("vqa_list") if isinstance(meta.get("vqa_list"), list) else []
            ac = meta.get("atom_count")
            geneval2.append(
                {"row": idx, "metadata": _json(meta),
                 "atom_count": ac if isinstance(ac, int) and not isinstance(ac, bool) else None,
                 "n_vqa": len(vqa) if isinstance(meta.get("vqa_list"), list) else None,
                 "n_skills": len(meta["skills"]) if isinstance(meta.get("skills"), list) else None}
            )
            skills = meta.get("skills") if isinstance(meta.get("skills"), list) else []
            for j, pair in enumerate(vqa):
                ok = isinstance(pair, list) and len(pair) == 2
                pairs.append(
                    {"row": idx, "pair_index": j, "answer": pair[1] if ok and isinstance(pair[1], str) else None,
                     "skill": skills[j] if j < len(skills) and isinstance(skills[j], str) else None}
                )
    frames = {
        "prompts": pd.DataFrame(prompts, columns=["row", "text", "id", "key", "parse_error", "dataset"]),
        "files": pd.DataFrame(files, columns=["row", "source", "dataset", "split", "records"]),
        "geneval": pd.DataFrame(geneval, columns=["row", "tag", "metadata"]),
        "geneval_entries": pd.DataFrame(
            entries, columns=["row", "field", "entry_index", "class", "count", "color", "relation", "group_index"]
        ),
        "geneval2": pd.DataFrame(geneval2, columns=["row", "metadata", "atom_count", "n_vqa", "n_skills"]),
        "geneval2_pairs": pd.DataFrame(pairs, columns=["row", "pair_index", "answer", "skill"]),
    }
    for name in ("geneval_entries",):
        for col in ("count", "group_index", "entry_index"):
            frames[name][col] = frames[name][col].astype("float64")
    frames["geneval2"]["atom_count"] = frames["geneval2"]["atom_count"].astype("float64")
    frames["geneval2"]["n_vqa"] = frames["geneval2"]["n_vqa"].astype("float64")
    frames["geneval2"]["n_skills"] = frames["geneval2"]["n_skills"].astype("float64")
    return frames


def _json(value: Any) -> str:
    """A metadata object as JSON text (the input of the JSON-schema expectations)."""
    return json.dumps(value, sort_keys=True, default=str)


def _length_groups(params: DataParams, rows: list[dict]) -> list[tuple[tuple[int, int], list[str]]]:
    """Datasets grouped by their (min_chars, max_chars); one length expectation per group."""
    bounds: dict[tuple[int, int], list[str]] = defaultdict(list)
    for ds in sorted({r["dataset"] for r in rows}):
        p = params.for_dataset(ds)
        bounds[(p.min_chars, p.max_chars)].append(ds)
    return sorted(bounds.items())


def _suites(params: DataParams, rows: list[dict]) -> dict[str, list[tuple[str, str, Any]]]:
    """frame name -> [(rule, description, expectation)]."""
    import great_expectations as gx

    E = gx.expectations
    v = params.validation
    s: dict[str, list] = defaultdict(list)
    s["files"] += [
        ("source.non_empty_file", "every ingested file yields at least one prompt",
         E.ExpectColumnValuesToBeBetween(column="records", min_value=1)),
    ]
    s["prompts"] += [
        ("prompt.parseable", "every line parses (valid JSON object or string)", E.ExpectColumnValuesToBeNull(column="parse_error")),
        ("prompt.not_null", "prompt text is present", E.ExpectColumnValuesToNotBeNull(column="text")),
        ("prompt.non_empty", "prompt text is non-empty after normalisation",
         E.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1)),
        ("prompt.valid_utf8", "no invalid UTF-8 bytes", E.ExpectColumnValuesToNotMatchRegex(column="text", regex=INVALID_UTF8)),
        ("prompt.no_control_chars", "no control characters (C0/C1, NUL)",
         E.ExpectColumnValuesToNotMatchRegex(column="text", regex=CONTROL)),
        ("id.not_null", "every prompt has an id", E.ExpectColumnValuesToNotBeNull(column="id")),
        ("id.unique", "ids are unique within dataset/split", E.ExpectColumnValuesToBeUnique(column="key")),
    ]
    for i, ((lo, hi), names) in enumerate(_length_groups(params, rows)):
        s[f"prompts_len{i}"] += [
            ("prompt.length_bounds", f"{lo} <= len(text) <= {hi} characters (datasets: {', '.join(names)})",
             E.ExpectColumnValueLengthsToBeBetween(column="text", min_value=lo, max_value=hi)),
        ]
    s["geneval"] += [
        ("geneval.keys", "only tag/prompt/include/exclude keys",
         E.ExpectColumnValuesToMatchJsonSchema(column="metadata", json_schema=schema.GENEVAL_KEYS_JSON_SCHEMA)),
        ("geneval.tag_in_set", f"tag in {list(schema.GENEVAL_TAGS)}",
         E.ExpectColumnValuesToBeInSet(column="tag", value_set=list(schema.GENEVAL_TAGS))),
        ("geneval.include_well_formed", "include is a non-empty list of {class, count, color?, position?}",
         E.ExpectColumnValuesToMatchJsonSchema(column="metadata", json_schema=schema.GENEVAL_INCLUDE_JSON_SCHEMA)),
        ("geneval.exclude_well_formed", "exclude is a list of {class, count}",
         E.ExpectColumnValuesToMatchJsonSchema(column="metadata", json_schema=schema.GENEVAL_EXCLUDE_JSON_SCHEMA)),
    ]
    s["geneval_entries"] += [
        ("geneval.class_in_coco80", "class is one of the 80 COCO names",
         E.ExpectColumnValuesToBeInSet(column="class", value_set=list(schema.coco80()))),
        ("geneval.count_in_range", f"1 <= count <= {v.geneval_max_count}",
         E.ExpectColumnValuesToBeBetween(column="count", min_value=1, max_value=v.geneval_max_count)),
        ("geneval.color_in_set", f"color in {list(schema.GENEVAL_COLORS)}",
         E.ExpectColumnValuesToBeInSet(column="color", value_set=list(schema.GENEVAL_COLORS))),
        ("geneval.relation_in_set", f"relation in {list(schema.GENEVAL_RELATIONS)}",
         E.ExpectColumnValuesToBeInSet(column="relation", value_set=list(schema.GENEVAL_RELATIONS))),
        ("geneval.group_index_earlier", "group_index >= 0",
         E.ExpectColumnValuesToBeBetween(column="group_index", min_value=0)),
        ("geneval.group_index_earlier", "group_index points to an earlier include entry (< own index)",
         E.ExpectColumnPairValuesAToBeGreaterThanB(
             column_A="entry_index", column_B="group_index", or_equal=False, ignore_row_if="either_value_is_missing")),
    ]
    s["geneval2"] += [
        ("geneval2.structure", "vqa_list of [question, answer] non-empty strings, integer atom_count, skills strings",
         E.ExpectColumnValuesToMatchJsonSchema(column="metadata", json_schema=schema.GENEVAL2_JSON_SCHEMA)),
        ("geneval2.structure", "one skill per VQA pair: len(skills) == len(vqa_list)",
         E.ExpectColumnPairValuesToBeEqual(
             column_A="n_skills", column_B="n_vqa", ignore_row_if="either_value_is_missing")),
        ("geneval2.atom_count_in_range", f"1 <= atom_count <= {v.geneval2_max_atoms}",
         E.ExpectColumnValuesToBeBetween(column="atom_count", min_value=1, max_value=v.geneval2_max_atoms)),
        ("geneval2.vqa_covers_atoms", "len(vqa_list) >= atom_count",
         E.ExpectColumnPairValuesAToBeGreaterThanB(
             column_A="n_vqa", column_B="atom_count", or_equal=True, ignore_row_if="either_value_is_missing")),
    ]
    s["geneval2_pairs"] += [
        ("geneval2.skill_in_set", f"skill in {list(schema.GENEVAL2_SKILLS)}",
         E.ExpectColumnValuesToBeInSet(column="skill", value_set=list(schema.GENEVAL2_SKILLS))),
    ]
    if v.geneval2_answers:
        s["geneval2_pairs"].append(
            ("geneval2.answer_in_set", f"answer in {v.geneval2_answers}",
             E.ExpectColumnValuesToBeInSet(column="answer", value_set=list(v.geneval2_answers)))
        )
    return s


# ----------------------------------------------------------------------------- GX plumbing
SUITE_PREFIX = "rtdmd_prompts"
_CTX: dict[str, Any] = {}
_RESULT_FORMAT = {"result_format": "COMPLETE", "unexpected_index_column_names": ["row"]}


def _context(gx_dir: Path | None):
    """The GX context: file-backed under ``gx_dir`` (reused by the next run), else in memory;
    one per directory per process (creating one costs ~0.1-1 s)."""
    key = str(Path(gx_dir).resolve()) if gx_dir is not None else ""
    if key not in _CTX:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        import great_expectations as gx

        from great_expectations.data_context.types.base import ProgressBarsConfig

        if gx_dir is None:
            ctx = gx.get_context(mode="ephemeral")
        else:
            Path(gx_dir).mkdir(parents=True, exist_ok=True)
            ctx = gx.get_context(mode="file", project_root_dir=str(gx_dir))
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        _CTX[key] = ctx
    return _CTX[key]


def _checkpoint(ctx, checks: list[tuple[str, str, str, Any]], with_docs: bool):
    """Store (add or update) the suite, validation definition and checkpoint ``rtdmd_prompts``:
    one run validates every frame and its ``UpdateDataDocsAction`` renders one Data Docs page."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.expectations.row_conditions import Column

    asset = ctx.data_sources.add_or_update_pandas(name=SUITE_PREFIX).add_dataframe_asset(name="frames")
    batch_def = asset.add_batch_definition_whole_dataframe("whole_frame")
    suite = gx.ExpectationSuite(name=SUITE_PREFIX, meta={"notes": "RTDMD prompt data rules (rtdmd.data.validate)"})
    for order, (frame, rule, desc, exp) in enumerate(checks):
        exp.row_condition = Column("frame") == frame
        exp.meta = {"rule": rule, "description": desc, "frame": frame, "order": order}
        suite.add_expectation(exp)
    suite = ctx.suites.add_or_update(suite)
    vd = ctx.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=SUITE_PREFIX, data=batch_def, suite=suite))
    actions = [UpdateDataDocsAction(name="update_data_docs")] if with_docs else []
    return ctx.checkpoints.add_or_update(
        gx.Checkpoint(name=SUITE_PREFIX, validation_definitions=[vd], actions=actions, result_format=_RESULT_FORMAT))


def _run(ctx, frames: dict[str, Any], suites: dict[str, list], with_docs: bool) -> list[dict]:
    """Run the checkpoint over the non-empty frames; one dict per expectation, in suite order."""
    import pandas as pd

    names = [n for n in suites if len(frames[n])]
    if not names:
        return []
    df = pd.concat([frames[n].assign(frame=n) for n in names], ignore_index=True)
    checks = [(n, *c) for n in names for c in suites[n]]
    cp_result = _checkpoint(ctx, checks, with_docs).run(batch_parameters={"dataframe": df})
    out = []
    for res in cp_result.run_results.values():
        for r in res.results:
            cfg = r.expectation_config
            out.append({"frame": cfg.meta["frame"], "order": cfg.meta["order"], "success": bool(r.success),
                        "rule": cfg.meta["rule"], "description": cfg.meta["description"], "expectation": cfg.type,
                        "kwargs": {k: v for k, v in cfg.kwargs.items() if k in ("column", "column_A", "column_B")},
                        "result": r.result, "exception": (r.exception_info or {}).get("exception_message")
                        if isinstance(r.exception_info, dict) else None})
    return sorted(out, key=lambda r: r["order"])


def data_docs_index(gx_dir: str | Path) -> Path:
    """``index.html`` of the local Data Docs site of the GX project under ``gx_dir``."""
    return Path(gx_dir) / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"


def _rows_of(result: dict) -> list[tuple[int, Any]]:
    """(row, offending value) pairs from a COMPLETE GX result."""
    res = result.get("result") or {}
    idx = res.get("unexpected_index_list") or []
    vals = res.get("unexpected_list") or []
    out = []
    for i, item in enumerate(idx):
        row = item.get("row") if isinstance(item, dict) else item
        val = vals[i] if i < len(vals) else None
        if isinstance(item, dict) and val is None:
            val = {k: v for k, v in item.items() if k != "row"} or None
        out.append((int(row), val))
    return out


# ----------------------------------------------------------------------------- report
def _plain(value: Any) -> Any:
    """numpy scalars -> Python; integral floats -> int; NaN -> None; tuples -> lists."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, float):
        if value != value:
            return None
        if value.is_integer():
            return int(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def escape(value: Any, limit: int = 160) -> Any:
    """Printable, JSON-safe rendering: control chars/surrogates escaped, long text truncated."""
    value = _plain(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if not isinstance(value, str):
        value = repr(value)
    n = len(value)
    text = value[:limit]
    out = []
    for ch in text:
        o = ord(ch)
        if 0xD800 <= o <= 0xDFFF:
            out.append(f"\\x{o - 0xDC00:02x}" if 0xDC80 <= o <= 0xDCFF else f"\\u{o:04x}")
        elif o < 0x20 or 0x7F <= o <= 0x9F:
            out.append(f"\\x{o:02x}")
        else:
            out.append(ch)
    s = "".join(out)
    return s + f"... ({n} chars)" if n > limit else s


def _markdown(report: dict) -> str:
    lines = [f"# Prompt data validation: {'PASSED' if report['passed'] else 'FAILED'}", ""]
    if "created_at" in report:  # failure reports; the published one carries no clock
        lines.append(f"- created: {report['created_at']}  ")
    lines.append(f"- rows checked: {report['rows_checked']}, files: {report['files_checked']}, "
                 f"expectations: {report['expectations_checked']}, failed rules: {len(report['failures'])}  ")
    lines.append(f"- great_expectations {report['gx_version']}")
    for f in report["failures"]:
        lines += ["", f"## `{f['rule']}` — {f['failing_rows']} failing row(s) of {f['checked_rows']}", "",
                  f"{f['description']}  ", f"expectation: `{f['expectation']}` on `{f['frame']}` {f['columns']}"]
        if f.get("exception"):
            lines.append(f"  \nGX raised: {f['exception']}")
        if f["examples"]:
            lines += ["", "| source | line | dataset/split | value | text |", "|---|---|---|---|---|"]
            for e in f["examples"]:
                cell = lambda x: str(x).replace("|", "\\|")
                lines.append(f"| {cell(e['source'])} | {e['line']} | {e['dataset']}/{e['split']} | "
                             f"{cell(e['value'])} | {cell(e['text'])} |")
    return "\n".join(lines) + "\n"


def validate_rows(
    rows: list[dict],
    files: Iterable[dict],
    params: DataParams,
    *,
    report_dir: str | Path | None = None,
    report_stem: str = "validation_report",
    raise_on_failure: bool = True,
    gx_dir: str | Path | None = None,
) -> ValidationOutcome:
    """Validate prompt rows; write the report on failure (and return it either way).

    With ``gx_dir`` the GX project there (created on first use) stores the suites, validation
    definitions and checkpoints, and each checkpoint's ``UpdateDataDocsAction`` refreshes the
    Data Docs site (:func:`data_docs_index`); without it the checkpoints run in memory.

    ``rows``: dicts with ``row`` (unique int), ``dataset``, ``split``, ``kind``
    (text/geneval/geneval2), ``id``, ``text``, ``metadata``, ``source``, ``line``, ``parse_error``.
    ``files``: dicts with ``source``, ``dataset``, ``split``, ``records`` (prompts read).
    """
    t0 = time.perf_counter()
    rows = list(rows)
    files = [dict(f, row=-(i + 1)) for i, f in enumerate(files)]  # negative row ids: file rows
    by_row = {r["row"]: r for r in rows}
    by_row.update({f["row"]: {"source": f["source"], "line": None, "dataset": f["dataset"], "split": f["split"],
                              "id": None, "text": None} for f in files})
    frames = _frames(rows, files, params)
    suites = _suites(params, rows)
    prompts = frames["prompts"]
    for i, (_, names) in enumerate(_length_groups(params, rows)):
        frames[f"prompts_len{i}"] = prompts.loc[prompts["dataset"].isin(names), ["row", "text"]]
    results = _run(_context(gx_dir), frames, suites, with_docs=gx_dir is not None)
    failures = []
    n_examples = params.validation.report_examples
    for res in results:
        if res["success"]:
            continue
        bad = _rows_of(res)
        seen, examples = set(), []
        for row, val in bad:
            if row in seen:
                continue
            seen.add(row)
            if len(examples) < n_examples:
                r = by_row.get(row, {})
                if res["kwargs"].get("column") == "text" and res["frame"].startswith("prompts"):
                    val = r.get("text")  # the original (undecodable bytes shown as \xNN)
                if res["kwargs"].get("column_A") and isinstance(_plain(val), list) and len(val) == 2:
                    val = f"{res['kwargs']['column_A']}={_plain(val[0])}, {res['kwargs']['column_B']}={_plain(val[1])}"
                examples.append({"source": r.get("source"), "line": r.get("line"), "dataset": r.get("dataset"),
                                 "split": r.get("split"), "id": r.get("id"), "value": escape(val, 80),
                                 "text": escape(r.get("text"))})
        gx_res = res["result"] or {}
        failures.append({
            "rule": res["rule"], "description": res["description"], "expectation": res["expectation"],
            "frame": res["frame"], "columns": res["kwargs"],
            "failing_rows": len(seen) if seen else int(gx_res.get("unexpected_count") or 0),
            "checked_rows": int(gx_res.get("element_count") or len(frames[res["frame"]])),
            "lines": sorted({(by_row.get(r, {}).get("source"), by_row.get(r, {}).get("line")) for r in seen},
                            key=lambda x: (str(x[0]), x[1] or 0))[:1000],
            "examples": examples, "exception": res["exception"],
        })
    import great_expectations as gx

    report = {
        "passed": not failures,
        "created_at": _now(),
        "gx_version": gx.__version__,
        "rows_checked": len(rows),
        "files_checked": len(files),
        "expectations_checked": len(results),
        "rules_checked": sorted({r["rule"] for r in results}),
        "failures": failures,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    for f in report["failures"]:
        f["lines"] = [{"source": s, "line": ln} for s, ln in f["lines"]]
    outcome = ValidationOutcome(passed=not failures, report=report)
    if gx_dir is not None:
        outcome.data_docs = data_docs_index(gx_dir)
    if failures and report_dir is not None:
        outcome.report_path = write_report(report, report_dir, report_stem, data_docs=outcome.data_docs)
    if failures and raise_on_failure:
        summary = "; ".join(f"{f['rule']}: {f['failing_rows']} row(s)" for f in failures)
        where = outcome.report_path or "<not written>"
        raise DataValidationError(f"prompt data failed validation ({summary}); report: {where}", where, failures,
                                  outcome.data_docs)
    return outcome


def write_report(report: dict, report_dir: str | Path, stem: str, *, data_docs: Path | None = None) -> Path:
    """``<stem>.json`` + ``<stem>.md`` in ``report_dir``; both name the Data Docs page if there is one."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    if data_docs is not None:
        report = dict(report, data_docs=str(data_docs))
    path = report_dir / f"{stem}.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    md = _markdown(report)
    if data_docs is not None:
        md = md.replace("\n\n", f"\n\n- Data Docs (great-expectations): {data_docs}\n", 1)
    (report_dir / f"{stem}.md").write_text(md, encoding="utf-8")
    return path


def _now() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    ts = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return ts.isoformat(timespec="seconds")
