"""The prep stage: own sets, the reference layout, S3 sources, and every bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rtdmd.data import formats, prepare
from rtdmd.testing.s3server import create_bucket, upload_tree

from data_helpers import jsonl, tool_env, write_bytes

ROOT = Path(__file__).resolve().parents[2]
GV = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}


def run_prepare(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = prepare.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _params(tmp_path, text: str) -> Path:
    p = tmp_path / "data.yaml"
    p.write_text(text)
    return p


def _report(out: Path) -> dict:
    return json.loads((out.parent / f"{out.name}.validation_report.json").read_text())


def _rules(out: Path) -> dict[str, list]:
    return {f["rule"]: [(x["source"], x["line"]) for x in f["lines"]] for f in _report(out)["failures"]}


# ----------------------------------------------------------------------------- good inputs
def test_prepare_project_sets(tmp_path, capsys):
    out = tmp_path / "prepared"
    rc, stdout, err = run_prepare(capsys, "--source", ROOT / "data" / "prompts", "--out", out,
                                  "--params", ROOT / "params" / "data.yaml")
    assert rc == 0, err
    assert stdout.strip() == str(out / "manifest.json")
    m = formats.read_manifest(out)  # checks every sha256
    assert m["counts"]["mini_geneval"] == {"train": 144, "test": 64}  # eval cap 64 (first N)
    assert m["datasets"]["mini_geneval"]["splits"]["test"]["capped"] == 8
    assert m["counts"]["mini_drawbench"] == {"test": 60}
    assert m["counts"]["mini_geneval2"] == {"train": 32, "test": 24}
    assert m["counts"]["toy2d"] == {"train": 3, "test": 3}  # overlap kept on purpose (params)
    assert m["validation"]["passed"] and len(m["validation"]["rules_checked"]) >= 20
    assert {f["kind"] for f in m["source_files"] if f["dataset"] == "mini_geneval"} == {"geneval"}
    test = formats.read_prepared(out, "mini_geneval", "test")
    raw = formats.read_prompts(ROOT / "data" / "prompts" / "mini_geneval" / "test_metadata.jsonl")
    assert [r["text"] for r in test] == [r.text for r in raw[:64]]  # file order kept
    assert [r["metadata"] for r in test] == [r.metadata for r in raw[:64]]
    assert test[0]["line"] == 1 and test[0]["source"].endswith("mini_geneval/test_metadata.jsonl")
    for ds in m["counts"]:
        for s in m["counts"][ds]:  # ids are unique within dataset/split (equal across splits iff same prompt)
            ids = [r["id"] for r in formats.read_prepared(out, ds, s)]
            assert len(ids) == len(set(ids))
    assert (out / "validation_report.md").read_text().startswith("# Prompt data validation: PASSED")
    # Deterministic: a second run gives byte-identical outputs, manifest included (no clock in them),
    # so DVC's md5 of the prepared directory does not change when a fresh clone re-runs the stage.
    out2 = tmp_path / "again"
    assert run_prepare(capsys, "--source", ROOT / "data" / "prompts", "--out", out2, "--params", ROOT / "params" / "data.yaml")[0] == 0
    m2 = formats.read_manifest(out2)
    assert m == m2
    assert (out / formats.MANIFEST).read_bytes() == (out2 / formats.MANIFEST).read_bytes()


@pytest.fixture
def reference_layout(tmp_path) -> Path:
    """A directory shaped like the reference's dataset/ (contents written here)."""
    root = tmp_path / "dataset"
    write_bytes(root / "drawbench" / "test.txt", b"p one\np two\np one\np three\np two")  # repeats, no final newline
    write_bytes(root / "drawbench" / "train.txt", b"placeholder prompt")
    gv = [GV, dict(GV, prompt="a photo of a cat", include=[{"class": "cat", "count": 1}]),
          {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}],
           "prompt": "a photo of two cups"}]
    write_bytes(root / "geneval" / "test_metadata.jsonl", jsonl(gv * 3))  # tiled like the reference
    write_bytes(root / "geneval2" / "test.jsonl", jsonl([
        {"prompt": "a red cat", "atom_count": 2, "vqa_list": [["Are there any cats?", "Yes"], ["Is the cat red?", "Yes"]],
         "skills": ["object", "attribute"]}]))
    write_bytes(root / "pickscore" / "train.txt", b"t1 prompt\nt2 prompt\nshared prompt\nt3 prompt\n")
    write_bytes(root / "pickscore" / "train_subset.txt", b"t1 prompt\n")
    write_bytes(root / "pickscore" / "test.txt", b"shared prompt\ns2 prompt\n")
    write_bytes(root / "ocr" / "test.txt", b'a sign that says "Open"\na mug with "Hi there"')
    write_bytes(root / "hpsv3" / "prompts.txt", "".join(f"hps prompt {i}\n" for i in range(10)).encode())
    write_bytes(root / "README.md", b"# not a dataset\n")
    return root


REF_PARAMS = """\
defaults: {min_chars: 3}
split_seed: 5
datasets:
  drawbench: {eval_cap: 2}
  hpsv3: {test_fraction: 0.2}
  geneval: {kind: geneval}
"""


def test_prepare_reference_layout(reference_layout, tmp_path, capsys):
    out = tmp_path / "prepared"
    rc, _, err = run_prepare(capsys, "--source", reference_layout, "--out", out, "--params", _params(tmp_path, REF_PARAMS))
    assert rc == 0, err
    m = formats.read_manifest(out)
    assert m["counts"] == {
        "drawbench": {"train": 1, "test": 2}, "geneval": {"test": 3}, "geneval2": {"test": 1},
        "hpsv3": {"train": 8, "test": 2}, "ocr": {"test": 2}, "pickscore": {"train": 3, "test": 2},
    }
    st = m["datasets"]
    assert st["drawbench"]["splits"]["test"] == {"read": 5, "duplicates_removed": 2, "capped": 1}
    assert st["geneval"]["splits"]["test"]["duplicates_removed"] == 6
    assert st["pickscore"]["splits"]["train"]["overlap_with_test_removed"] == 1
    assert st["hpsv3"]["splits"]["unsplit"] == {"read": 10, "duplicates_removed": 0, "to_train": 8, "to_test": 2}
    assert [r["text"] for r in formats.read_prepared(out, "drawbench", "test")] == ["p one", "p two"]
    assert m["sources"][0]["ignored"] == [f"{reference_layout}/pickscore/train_subset.txt"]
    assert formats.read_prepared(out, "geneval", "test")[2]["metadata"]["exclude"] == [{"class": "cup", "count": 3}]
    # the unsplit split is seeded and order-free: same seed, same test prompts
    hps_test = [r["text"] for r in formats.read_prepared(out, "hpsv3", "test")]
    out2 = tmp_path / "p2"
    assert run_prepare(capsys, "--source", f"hps={reference_layout}/hpsv3/prompts.txt", "--out", out2,
                       "--params", _params(tmp_path, REF_PARAMS.replace("hpsv3:", "hps:")))[0] == 0
    assert [r["text"] for r in formats.read_prepared(out2, "hps", "test")] == hps_test
    out3 = tmp_path / "p3"
    assert run_prepare(capsys, "--source", f"hps={reference_layout}/hpsv3/prompts.txt", "--out", out3,
                       "--params", _params(tmp_path, REF_PARAMS.replace("hpsv3:", "hps:").replace("seed: 5", "seed: 6")))[0] == 0
    assert [r["text"] for r in formats.read_prepared(out3, "hps", "test")] != hps_test


def test_single_dataset_dir_and_loader(reference_layout, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert run_prepare(capsys, "--source", reference_layout / "geneval", "--source", reference_layout / "ocr" / "test.txt",
                       "--out", out)[0] == 0
    m = formats.read_manifest(out)
    assert set(m["counts"]) == {"geneval", "ocr"}
    items = formats.load_prompts(out, "geneval", "test", cap=2, return_metadata=True)
    assert items[0] == {"prompt": "a photo of a dog", "metadata": GV}


def test_prepare_from_s3(reference_layout, s3_environ, tmp_path, capsys):
    create_bucket(s3_environ, "rtdmd-prompts")
    upload_tree(s3_environ, "rtdmd-prompts", "raw/dataset", reference_layout)
    out = tmp_path / "prepared"
    rc, _, err = run_prepare(capsys, "--source", "s3://rtdmd-prompts/raw/dataset",
                             "--source", "s3://rtdmd-prompts/raw/dataset/ocr/test.txt", "--out", out,
                             "--params", _params(tmp_path, REF_PARAMS + "  ocr: {dedupe: true}\n"))
    assert rc == 0, err
    m = formats.read_manifest(out)
    assert m["counts"]["drawbench"] == {"train": 1, "test": 2}
    assert m["sources"][0]["kind"] == "s3" and m["sources"][0]["endpoint"] == s3_environ
    srcs = {f["source"] for f in m["source_files"]}
    assert "s3://rtdmd-prompts/raw/dataset/geneval/test_metadata.jsonl" in srcs
    assert all(f.get("etag") for f in m["source_files"])
    assert formats.read_prepared(out, "ocr", "test")[0]["source"].startswith("s3://rtdmd-prompts/")
    rc, _, err = run_prepare(capsys, "--source", "s3://rtdmd-prompts/nothing-here", "--out", tmp_path / "x")
    assert rc == 1 and "no prompt files under s3://rtdmd-prompts/nothing-here" in err


# ----------------------------------------------------------------------------- bad inputs
def _prep_one(tmp_path, capsys, name: str, data: bytes, params: str = "defaults: {min_chars: 3}\n"):
    src = write_bytes(tmp_path / "src" / "ds" / name, data)
    out = tmp_path / "out" / "prepared"
    rc, stdout, err = run_prepare(capsys, "--source", tmp_path / "src", "--out", out, "--params", _params(tmp_path, params))
    return rc, out, err, src


def _assert_failed(rc, out, err, rule, lines):
    assert rc == 2, err
    assert not out.exists()  # nothing published
    report = out.parent / "prepared.validation_report.json"
    assert f"report: {report}" in err and (out.parent / "prepared.validation_report.md").is_file()
    rules = _rules(out)
    assert rule in rules, rules
    assert sorted(ln for _, ln in rules[rule]) == lines
    return rules


def test_bad_empty_file(tmp_path, capsys):
    rc, out, err, src = _prep_one(tmp_path, capsys, "test.txt", b"")
    rules = _assert_failed(rc, out, err, "source.non_empty_file", [None])
    assert rules["source.non_empty_file"][0][0] == str(src)
    assert f"source.non_empty_file: 1 row(s), e.g. {src}" in err
    # blank lines only is just as empty
    rc, out, err, _ = _prep_one(tmp_path, capsys, "test.txt", b"\n  \r\n\n")
    _assert_failed(rc, out, err, "source.non_empty_file", [None])


def test_bom_and_crlf_accepted_and_normalised(tmp_path, capsys):
    rc, out, err, _ = _prep_one(tmp_path, capsys, "test.txt", "\ufeffa  cafe\u0301\r\nsecond  prompt\r\n".encode())
    assert rc == 0, err
    recs = formats.read_prepared(out, "ds", "test")
    assert [r["text"] for r in recs] == ["a caf\u00e9", "second prompt"]
    assert recs[0]["id"] == formats.prompt_id("ds", "a caf\u00e9")
    raw = (out / "ds" / "test.jsonl").read_bytes()
    assert b"\r" not in raw and "\ufeff".encode() not in raw


def test_bad_invalid_utf8(tmp_path, capsys):
    rc, out, err, src = _prep_one(tmp_path, capsys, "test.txt", b"fine prompt\nbad \xff\xfe bytes\n")
    _assert_failed(rc, out, err, "prompt.valid_utf8", [2])
    assert f"prompt.valid_utf8: 1 row(s), e.g. {src}:2" in err


def test_bad_nul_byte(tmp_path, capsys):
    rc, out, err, src = _prep_one(tmp_path, capsys, "test.txt", b"fine prompt\nanother\nnul\x00inside\n")
    _assert_failed(rc, out, err, "prompt.no_control_chars", [3])


def test_bad_one_megabyte_line(tmp_path, capsys):
    rc, out, err, src = _prep_one(tmp_path, capsys, "test.txt", b"fine prompt\n" + b"y" * 1_000_000 + b"\n")
    _assert_failed(rc, out, err, "prompt.length_bounds", [2])
    assert (out.parent / "prepared.validation_report.json").stat().st_size < 50_000  # examples truncated
    # above the reader guard the read stops with file:line (exit 1)
    rc, out, err, src = _prep_one(tmp_path, capsys, "test.txt", b"ok\n" + b"z" * 5000 + b"\n", "max_line_bytes: 4096\n")
    assert rc == 1 and f"{src}:2: line is 5000 bytes" in err


def test_duplicates_deduped_and_counted(tmp_path, capsys):
    rc, out, err, _ = _prep_one(tmp_path, capsys, "train.txt", b"a cat\na dog\na  cat\na cat\na bird\na dog\n")
    assert rc == 0, err
    m = formats.read_manifest(out)
    assert [r["text"] for r in formats.read_prepared(out, "ds", "train")] == ["a cat", "a dog", "a bird"]
    assert m["datasets"]["ds"]["splits"]["train"]["duplicates_removed"] == 3
    assert "prepared 3 prompts" in err


def test_keep_repeats_when_dedupe_is_off(tmp_path, capsys):
    """The reference's DrawBench file repeats prompts; dedupe: false keeps them (ids suffixed)."""
    rc, out, err, _ = _prep_one(tmp_path, capsys, "test.txt", b"p one\np two\np one\np three\n",
                                "defaults: {dedupe: false, eval_cap: 3}\n")
    assert rc == 0, err
    recs = formats.read_prepared(out, "ds", "test")
    base = formats.prompt_id("ds", "p one")
    assert [(r["text"], r["id"]) for r in recs] == [("p one", base), ("p two", formats.prompt_id("ds", "p two")),
                                                    ("p one", f"{base}-1")]


def test_bad_geneval_unknown_class(tmp_path, capsys):
    rows = [GV, dict(GV, prompt="a photo of a unicorn", include=[{"class": "unicorn", "count": 1}]), GV | {"prompt": "a photo of a dog again"},
            dict(GV, prompt="two", include=[{"class": "cat", "count": 1}, {"class": "dragon", "count": 2}])]
    rc, out, err, _ = _prep_one(tmp_path, capsys, "test_metadata.jsonl", jsonl(rows))
    rules = _assert_failed(rc, out, err, "geneval.class_in_coco80", [2, 4])
    assert set(rules) == {"geneval.class_in_coco80"}
    md = (out.parent / "prepared.validation_report.md").read_text()
    assert "unicorn" in md and "dragon" in md


@pytest.mark.parametrize("include,rule", [
    ("dog", "geneval.include_well_formed"),
    ([], "geneval.include_well_formed"),
    ([{"class": "dog"}], "geneval.include_well_formed"),
    ([{"class": "dog", "count": "two"}], "geneval.include_well_formed"),
    ([{"class": "dog", "count": 1, "position": "left of"}], "geneval.include_well_formed"),
    ([{"class": "dog", "count": 1, "position": ["left of", 0]}], "geneval.group_index_earlier"),
    (None, "geneval.include_well_formed"),
])
def test_bad_geneval_malformed_include(tmp_path, capsys, include, rule):
    bad = dict(GV, prompt="a broken line")
    if include is None:
        del bad["include"]
    else:
        bad["include"] = include
    rc, out, err, _ = _prep_one(tmp_path, capsys, "test_metadata.jsonl", jsonl([GV, bad]))
    _assert_failed(rc, out, err, rule, [2])


def test_bad_directory_without_recognised_file(tmp_path, capsys):
    write_bytes(tmp_path / "src" / "ds" / "notes.md", b"hello\n")
    write_bytes(tmp_path / "src" / "ds" / "images" / "a.png", b"\x89PNG")
    rc, _, err = run_prepare(capsys, "--source", tmp_path / "src", "--out", tmp_path / "out")
    assert rc == 1 and "no recognised prompt file" in err and "test_metadata.jsonl" in err
    assert not (tmp_path / "out").exists()
    rc, _, err = run_prepare(capsys, "--source", tmp_path / "missing", "--out", tmp_path / "out")
    assert rc == 1 and "no such file or directory" in err


def test_failure_keeps_previous_version(tmp_path, capsys):
    rc, out, err, src = _prep_one(tmp_path, capsys, "test.txt", b"a good prompt\n")
    assert rc == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    src.write_bytes(b"a good prompt\nnul\x00\n")
    rc, _, err = run_prepare(capsys, "--source", tmp_path / "src", "--out", out, "--params", tmp_path / "data.yaml")
    assert rc == 2
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # the GX checkpoint's Data Docs sit next to the prepared data, one page per prep run
    docs = out.parent / "prepared.gx" / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    assert f"data docs: {docs}" in err and docs.is_file()
    assert "'_validation_success_text': 'Failed'" in docs.read_text()
    src.write_bytes(b"a good prompt\nanother good one\n")
    assert run_prepare(capsys, "--source", tmp_path / "src", "--out", out, "--params", tmp_path / "data.yaml")[0] == 0
    assert not (out.parent / "prepared.validation_report.json").exists()  # stale failure report removed
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared", "prepared.gx"]
    assert len(list(docs.parent.glob("validations/rtdmd_prompts/**/*.html"))) == 3  # pass, fail, pass


def test_bad_params(tmp_path, capsys):
    rc, _, err = run_prepare(capsys, "--source", tmp_path, "--out", tmp_path / "o", "--params",
                             _params(tmp_path, "defaults: {min_char: 3}\n"))
    assert rc == 1 and "unknown key 'defaults.min_char'" in err and "did you mean 'min_chars'" in err
    rc, _, err = run_prepare(capsys, "--out", tmp_path / "o")
    assert rc == 1 and "no --source" in err


def test_cli_subprocess_reports_path_and_exit_code(tmp_path):
    write_bytes(tmp_path / "src" / "ds" / "test.txt", b"ok prompt\n\xc3\x28 broken\n")
    res = subprocess.run([sys.executable, "-m", "rtdmd.data.prepare", "--source", str(tmp_path / "src"),
                          "--out", str(tmp_path / "prepared")], capture_output=True, text=True, env=tool_env(), cwd=tmp_path)
    assert res.returncode == 2
    assert f"report: {tmp_path / 'prepared.validation_report.json'}" in res.stderr
    assert f"{tmp_path / 'src' / 'ds' / 'test.txt'}:2" in res.stderr
    assert "Calculating Metrics" not in res.stderr  # GX progress bars are off
