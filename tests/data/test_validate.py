"""Every validation rule has a failing example whose report names the rule and the offending lines."""
from __future__ import annotations

import json

import pytest

from rtdmd.data import validate
from rtdmd.data.params import params_from_mapping

PARAMS = params_from_mapping({"defaults": {"min_chars": 3, "max_chars": 2000}})
GOOD_GV = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}
GOOD_G2 = {"prompt": "a red cat", "atom_count": 2, "vqa_list": [["Are there any cats?", "Yes"], ["Is the cat red?", "Yes"]],
           "skills": ["object", "attribute"]}


def _row(line, text, *, kind="text", meta=None, dataset="ds", split="test", source="src/bad.jsonl", rid=None, parse_error=None):
    return {"dataset": dataset, "split": split, "kind": kind, "text": text, "metadata": meta, "source": source,
            "line": line, "parse_error": parse_error, "id": rid if rid is not None else (None if text is None else f"id{line}")}


def _gv(line, **changes):
    meta = json.loads(json.dumps(GOOD_GV))
    meta.update(changes)
    return _row(line, meta.get("prompt", "a photo"), kind="geneval", meta=meta, dataset="gv", source="gv/test_metadata.jsonl")


def _g2(line, **changes):
    meta = json.loads(json.dumps(GOOD_G2))
    meta.update(changes)
    return _row(line, meta["prompt"] + f" {line}", kind="geneval2", meta=meta, dataset="g2", source="g2/test.jsonl")


BAD_ROWS = [
    _row(1, None, parse_error="src/bad.jsonl:1: not valid JSON"),
    _row(2, ""),
    _row(3, "bad \udcff\udcfe bytes"),
    _row(4, "nul\x00here"),
    _row(5, "x" * 3000),
    _row(6, "same id a", rid="dup"),
    _row(7, "same id b", rid="dup"),
    _gv(8, colour="red"),
    _gv(9, tag="bogus"),
    _gv(10, include="dog"),
    _gv(11, exclude=[{"class": "dog"}]),
    _gv(12, include=[{"class": "unicorn", "count": 1}]),
    _gv(13, include=[{"class": "dog", "count": 99}]),
    _gv(14, include=[{"class": "dog", "count": 1, "color": "teal"}]),
    _gv(15, include=[{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["behind", 0]}]),
    _gv(16, include=[{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["above", 1]}]),
    _gv(17, include=[{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["above", -1]}]),
    _g2(18, vqa_list="x"),
    _g2(19, atom_count=0),
    _g2(20, atom_count=5),
    _g2(21, skills=["object", "dance"]),
    _g2(22, vqa_list=[["Are there any cats?", "Yes"], ["Is the cat red?", "maybe"]]),
    _row(23, "a perfectly fine prompt"),
    _gv(24),
    _g2(25),
]
FILES = [{"source": "src/empty.txt", "dataset": "empty", "split": "unsplit", "records": 0},
         {"source": "src/bad.jsonl", "dataset": "ds", "split": "test", "records": 7}]

# rule -> (source, lines) that must be reported
EXPECTED = {
    "source.non_empty_file": ("src/empty.txt", [None]),
    "prompt.parseable": ("src/bad.jsonl", [1]),
    "prompt.not_null": ("src/bad.jsonl", [1]),
    "id.not_null": ("src/bad.jsonl", [1]),
    "prompt.non_empty": ("src/bad.jsonl", [2]),
    "prompt.valid_utf8": ("src/bad.jsonl", [3]),
    "prompt.no_control_chars": ("src/bad.jsonl", [4]),
    "prompt.length_bounds": ("src/bad.jsonl", [2, 5]),
    "id.unique": ("src/bad.jsonl", [6, 7]),
    "geneval.keys": ("gv/test_metadata.jsonl", [8]),
    "geneval.tag_in_set": ("gv/test_metadata.jsonl", [9]),
    "geneval.include_well_formed": ("gv/test_metadata.jsonl", [10]),
    "geneval.exclude_well_formed": ("gv/test_metadata.jsonl", [11]),
    "geneval.class_in_coco80": ("gv/test_metadata.jsonl", [12]),
    "geneval.count_in_range": ("gv/test_metadata.jsonl", [13]),
    "geneval.color_in_set": ("gv/test_metadata.jsonl", [14]),
    "geneval.relation_in_set": ("gv/test_metadata.jsonl", [15]),
    "geneval.group_index_earlier": ("gv/test_metadata.jsonl", [16, 17]),
    "geneval2.structure": ("g2/test.jsonl", [18]),
    "geneval2.atom_count_in_range": ("g2/test.jsonl", [19]),
    "geneval2.vqa_covers_atoms": ("g2/test.jsonl", [20]),
    "geneval2.skill_in_set": ("g2/test.jsonl", [21]),
    "geneval2.answer_in_set": ("g2/test.jsonl", [22]),
}


def _with_rows(rows):
    return [dict(r, row=i) for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def bad_report(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    with pytest.raises(validate.DataValidationError) as info:
        validate.validate_rows(_with_rows(BAD_ROWS), FILES, PARAMS, report_dir=d, report_stem="prep.validation_report")
    err = info.value
    assert err.report_path == d / "prep.validation_report.json"
    return err, json.loads(err.report_path.read_text()), (d / "prep.validation_report.md").read_text()


def test_every_rule_is_exercised():
    import great_expectations  # noqa: F401  (the suite builder needs it)

    defined = {rule for checks in validate._suites(PARAMS, _with_rows(BAD_ROWS)).values() for rule, _, _ in checks}
    assert defined == set(EXPECTED)


@pytest.mark.parametrize("rule", sorted(EXPECTED))
def test_rule_fails_with_lines(bad_report, rule):
    err, report, md = bad_report
    source, lines = EXPECTED[rule]
    failures = [f for f in report["failures"] if f["rule"] == rule]
    assert failures, f"{rule} did not fail"
    reported = {(x["source"], x["line"]) for f in failures for x in f["lines"]}
    assert {(source, ln) for ln in lines} <= reported
    # exactly the offending lines (no good row is blamed)
    assert {ln for _, ln in reported} == set(lines)
    f = failures[0]
    assert f["failing_rows"] >= 1 and f["checked_rows"] >= f["failing_rows"] and f["examples"]
    assert f["expectation"].startswith("expect_")
    assert f"`{rule}`" in md
    assert rule in str(err)


def test_report_is_readable(bad_report):
    _, report, md = bad_report
    assert report["passed"] is False and report["rows_checked"] == len(BAD_ROWS)
    utf8 = next(f for f in report["failures"] if f["rule"] == "prompt.valid_utf8")
    assert utf8["examples"][0]["text"] == "bad \\xff\\xfe bytes"  # the undecodable bytes, escaped
    nul = next(f for f in report["failures"] if f["rule"] == "prompt.no_control_chars")
    assert nul["examples"][0]["text"] == "nul\\x00here"
    long = next(f for f in report["failures"] if f["rule"] == "prompt.length_bounds")
    assert all(len(e["text"] or "") < 400 for e in long["examples"])  # long lines are truncated
    assert "| gv/test_metadata.jsonl | 12 |" in md


def test_clean_rows_pass_and_write_nothing(tmp_path):
    rows = _with_rows([_row(1, "a fine prompt"), _gv(2), _g2(3)])
    out = validate.validate_rows(rows, [{"source": "s", "dataset": "ds", "split": "test", "records": 3}], PARAMS,
                                 report_dir=tmp_path)
    assert out.passed and out.report["failures"] == [] and out.report_path is None
    assert list(tmp_path.iterdir()) == []
    assert set(out.report["rules_checked"]) == set(EXPECTED)


def test_answer_rule_can_be_disabled():
    params = params_from_mapping({"validation": {"geneval2_answers": []}})
    rows = _with_rows([_g2(1, vqa_list=[["Are there any cats?", "maybe"], ["Is the cat red?", "Yes"]])])
    out = validate.validate_rows(rows, [], params, raise_on_failure=False)
    assert out.passed


def _stored_context(gx_dir):
    import great_expectations as gx

    return gx.get_context(mode="file", project_root_dir=str(gx_dir))


def test_checkpoint_stores_suite_and_data_docs_on_failing_and_passing_data(tmp_path):
    """The rules are a stored GX suite run by a stored Checkpoint whose UpdateDataDocsAction
    renders the result; a later passing run adds its own page to the same site."""
    import re

    gx_dir = tmp_path / "prep.gx"
    with pytest.raises(validate.DataValidationError) as info:
        validate.validate_rows(_with_rows(BAD_ROWS), FILES, PARAMS, report_dir=tmp_path, report_stem="prep.validation_report",
                               gx_dir=gx_dir)
    index = info.value.data_docs
    assert index == validate.data_docs_index(gx_dir) and index.is_file()
    assert f"Data Docs (great-expectations): {index}" in (tmp_path / "prep.validation_report.md").read_text()
    html = index.read_text()
    assert "'expectation_suite_name': 'rtdmd_prompts'" in html
    assert re.findall(r"_validation_success_text': '(\w+)'", html) == ["Failed"]
    pages = sorted(index.parent.glob("validations/rtdmd_prompts/**/*.html"))
    assert len(pages) == 1
    page = pages[0].read_text()
    assert ">frame == geneval_entries<" in page and "unicorn" in page  # the failed class_in_coco80 expectation

    # stored on disk: a fresh context reads the suite (one expectation per rule, with its row condition) and
    # the checkpoint with its Data Docs action
    ctx = _stored_context(gx_dir)
    suite = ctx.suites.get("rtdmd_prompts")
    assert {e.meta["rule"] for e in suite.expectations} == set(EXPECTED)
    json_schema_rules = {e.meta["rule"] for e in suite.expectations if e.expectation_type == "expect_column_values_to_match_json_schema"}
    assert json_schema_rules == {"geneval.keys", "geneval.include_well_formed", "geneval.exclude_well_formed", "geneval2.structure"}
    assert all(e.row_condition is not None for e in suite.expectations)
    checkpoint = ctx.checkpoints.get("rtdmd_prompts")
    assert [a.type for a in checkpoint.actions] == ["update_data_docs"]
    assert [vd.name for vd in checkpoint.validation_definitions] == ["rtdmd_prompts"]

    validate._CTX.clear()  # the next run reopens the stored project, as a new process would
    rows = _with_rows([_row(1, "a fine prompt"), _gv(2), _g2(3)])
    out = validate.validate_rows(rows, [{"source": "s", "dataset": "ds", "split": "test", "records": 3}], PARAMS,
                                 gx_dir=gx_dir)
    assert out.passed and out.data_docs == index
    assert sorted(re.findall(r"_validation_success_text': '(\w+)'", index.read_text())) == ["Failed", "Success"]
    assert len(list(index.parent.glob("validations/rtdmd_prompts/**/*.html"))) == 2


@pytest.mark.parametrize("meta_change,rule", [
    ({"include": [{"class": "dog", "count": 1.0}]}, "geneval.include_well_formed"),  # 1.0 is not an integer
    ({"include": [{"class": "dog", "count": True}]}, "geneval.include_well_formed"),
    ({"include": [{"class": "dog", "count": 1, "size": "big"}]}, "geneval.include_well_formed"),
    ({"exclude": [{"class": "dog", "count": 1, "color": "red"}]}, "geneval.exclude_well_formed"),
])
def test_json_schema_rules_match_the_writers_checks(meta_change, rule):
    """The JSON-schema expectations refuse exactly what :mod:`rtdmd.data.schema` refuses."""
    from rtdmd.data import schema

    row = _gv(1, **meta_change)
    assert schema.geneval_errors(row["metadata"])  # the writer refuses it ...
    out = validate.validate_rows(_with_rows([row]), [], PARAMS, raise_on_failure=False)
    assert [f["rule"] for f in out.report["failures"]] == [rule]  # ... and so does the suite
