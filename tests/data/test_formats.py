"""Raw prompt formats (txt / GenEval jsonl / GenEval2 jsonl / json) and the prepared form."""
from __future__ import annotations

import hashlib
import json

import pytest

from rtdmd.data import formats, schema
from rtdmd.data.formats import PromptFormatError

GENEVAL_ROWS = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "counting", "include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}],
     "prompt": "a photo of three dogs"},
    {"tag": "position", "include": [{"class": "cup", "count": 1},
                                    {"class": "tv remote", "count": 1, "position": ["left of", 0]}],
     "prompt": "a photo of a tv remote left of a cup"},
    {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                      {"class": "hair drier", "count": 1, "color": "white"}],
     "prompt": "a photo of a red car and a white hair drier"},
]
GENEVAL2_ROWS = [
    {"prompt": "two brown dogs sleeping below a red kite", "atom_count": 4,
     "vqa_list": [["Are there any dogs?", "Yes"], ["How many dogs are there?", "two"],
                  ["Are the dogs brown?", "Yes"], ["Are the dogs below the kite?", "Yes"]],
     "skills": ["object", "count", "attribute", "position"]},
]


def test_coco80_asset():
    names = schema.coco80()
    assert len(names) == 80 and names[0] == "person" and names[-1] == "toothbrush"
    for multi in ("traffic light", "wine glass", "dining table", "computer keyboard", "tv remote",
                  "computer mouse", "hair drier"):
        assert multi in names


def test_coco80_matches_the_geneval_scorer_labels():
    """Validation and the GenEval scorer must agree on the class list (detector label order)."""
    from pathlib import Path

    scorer = Path(__file__).resolve().parents[2] / "rtdmd" / "rewards" / "assets" / "object_names.txt"
    if not scorer.is_file():
        pytest.skip("rewards assets not present")
    assert tuple(x.strip() for x in scorer.read_text().splitlines() if x.strip()) == schema.coco80()


def test_text_round_trip(tmp_path):
    prompts = ["a cat", "a dog on a sofa", 'a sign that says "hi"', "naïve café ☕"]
    p = tmp_path / "x.txt"
    formats.write_text(p, prompts)
    assert p.read_bytes().endswith(b"\n") and b"\r" not in p.read_bytes()
    recs = formats.read_prompts(p)
    assert [r.text for r in recs] == prompts
    assert [r.line for r in recs] == [1, 2, 3, 4]
    assert all(r.metadata is None for r in recs)
    with pytest.raises(PromptFormatError):
        formats.write_text(tmp_path / "bad.txt", ["two\nlines"])


def test_text_reader_bom_crlf_blank_lines(tmp_path):
    p = tmp_path / "x.TXT"  # extension is case-insensitive
    p.write_bytes(b"\xef\xbb\xbf first \r\n\r\n  \r\nsecond\r\nthird")  # no trailing newline
    recs = formats.read_prompts(p)
    assert [(r.text, r.line) for r in recs] == [("first", 1), ("second", 4), ("third", 5)]


def test_geneval_jsonl_round_trip(tmp_path):
    p = tmp_path / "test_metadata.jsonl"
    formats.write_geneval_jsonl(p, GENEVAL_ROWS)
    recs = formats.read_prompts(p)
    assert [r.metadata for r in recs] == GENEVAL_ROWS
    assert [r.text for r in recs] == [r["prompt"] for r in GENEVAL_ROWS]
    # canonical key order: tag, include, exclude?, prompt
    first = json.loads(p.read_text().splitlines()[1])
    assert list(first) == ["tag", "include", "exclude", "prompt"]
    # records written back give the same bytes
    q = tmp_path / "again.jsonl"
    formats.write_geneval_jsonl(q, recs)
    assert q.read_bytes() == p.read_bytes()


@pytest.mark.parametrize("bad", [
    {"tag": "counting", "include": [{"class": "unicorn", "count": 2}], "prompt": "x"},
    {"tag": "counting", "include": "dog", "prompt": "x"},
    {"tag": "position", "include": [{"class": "dog", "count": 1, "position": ["left of", 0]}], "prompt": "x"},
    {"tag": "nope", "include": [{"class": "dog", "count": 1}], "prompt": "x"},
])
def test_geneval_writer_refuses_invalid(tmp_path, bad):
    with pytest.raises(PromptFormatError, match="not a valid GenEval line"):
        formats.write_geneval_jsonl(tmp_path / "x.jsonl", [bad])


def test_geneval2_jsonl_round_trip(tmp_path):
    p = tmp_path / "test.jsonl"
    formats.write_geneval2_jsonl(p, GENEVAL2_ROWS)
    recs = formats.read_prompts(p)
    assert [r.metadata for r in recs] == GENEVAL2_ROWS
    bad = dict(GENEVAL2_ROWS[0], atom_count=9)
    with pytest.raises(PromptFormatError, match="atom_count"):
        formats.write_geneval2_jsonl(tmp_path / "bad.jsonl", [bad])


def test_json_and_generic_jsonl_round_trip(tmp_path):
    p = tmp_path / "prompts.json"
    formats.write_json(p, ["a", "b c"])
    assert [r.text for r in formats.read_prompts(p)] == ["a", "b c"]
    assert [r.line for r in formats.read_prompts(p)] == [1, 2]  # item numbers
    formats.write_prompts(p, [{"prompt": "x", "k": 1}, {"text": "y"}])
    recs = formats.read_prompts(p)
    assert [r.text for r in recs] == ["x", "y"] and recs[0].metadata == {"prompt": "x", "k": 1}
    q = tmp_path / "mixed.jsonl"
    formats.write_jsonl(q, ["plain", {"text": "t"}, {"other": 1}])
    recs = formats.read_prompts(q)
    assert [r.text for r in recs] == ["plain", "t", ""]  # dict without prompt/text gives ""
    assert recs[0].item(True) == {"prompt": "plain", "metadata": {"prompt": "plain"}}


def test_strict_reader_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\nbad \xff\xfe bytes\n")
    with pytest.raises(PromptFormatError, match=r"bad\.txt:2: invalid UTF-8"):
        formats.read_prompts(bad)
    recs = formats.read_prompts(bad, strict=False)  # kept as surrogate escapes for validation
    assert "\udcff" in recs[1].text
    j = tmp_path / "bad.jsonl"
    j.write_bytes(b'{"prompt": "a"}\n\n{not json}\n')
    with pytest.raises(PromptFormatError, match=r"bad\.jsonl:3: not valid JSON"):
        formats.read_prompts(j)
    assert formats.read_prompts(j, strict=False)[1].parse_error
    k = tmp_path / "num.jsonl"
    k.write_bytes(b"42\n")
    with pytest.raises(PromptFormatError, match="object or a string"):
        formats.read_prompts(k)
    with pytest.raises(PromptFormatError, match="non-empty list"):
        (tmp_path / "e.json").write_text("[]")
        formats.read_prompts(tmp_path / "e.json")
    with pytest.raises(PromptFormatError, match="unsupported"):
        (tmp_path / "x.csv").write_text("a\n")
        formats.read_prompts(tmp_path / "x.csv")
    with pytest.raises(PromptFormatError, match="reader limit"):
        formats.read_prompts(bad, max_line_bytes=4)


def test_normalise_and_ids():
    assert formats.normalise_text("\ufeff  e\u0301cole \t\r\n  du  soir ") == "\u00e9cole du soir"
    assert formats.prompt_id("ds", "a cat") == hashlib.sha256(b"ds\x00a cat").hexdigest()[:16]
    assert formats.prompt_id("ds", "a cat") != formats.prompt_id("other", "a cat")


def test_resolve_prompt_file_reference_order(tmp_path):
    for name in ("train.txt", "train_metadata.jsonl", "prompts.txt", "test_metadata.jsonl", "metadata.jsonl"):
        (tmp_path / name).write_text('{"prompt": "x"}\n' if name.endswith("jsonl") else "x\n")
    assert formats.resolve_prompt_file(tmp_path, "train").name == "train.txt"
    assert formats.resolve_prompt_file(tmp_path, "train", return_metadata=True).name == "train_metadata.jsonl"
    assert formats.resolve_prompt_file(tmp_path, "test").name == "test_metadata.jsonl"
    (tmp_path / "test.jsonl").write_text('{"prompt": "y"}\n')
    assert formats.resolve_prompt_file(tmp_path, "test").name == "test.jsonl"
    only = tmp_path / "only"
    only.mkdir()
    (only / "prompts.txt").write_text("x\n")
    assert formats.resolve_prompt_file(only, "test").name == "prompts.txt"  # the fallback of both splits
    assert formats.resolve_prompt_file(only, "train").name == "prompts.txt"
    with pytest.raises(FileNotFoundError):
        formats.resolve_prompt_file(tmp_path / "nothing", "test")


def test_publish_prepared_atomic_and_verified(tmp_path):
    out = tmp_path / "prepared"
    rec = formats.prepared_record("ds", "test", "a cat", None, "src.txt", 1)
    formats.publish_prepared(out, {"ds/test.jsonl": formats.encode_prepared([rec])}, {"format": formats.PREPARED_FORMAT})
    m = formats.read_manifest(out)
    assert m["files"]["ds/test.jsonl"]["rows"] == 1 and len(m["data_version"]) == 64
    assert formats.read_prepared(out, "ds", "test") == [rec]
    assert formats.load_prompts(out, "ds", "test") == ["a cat"]
    assert formats.load_prompts(out, "ds", "test", return_metadata=True) == [{"prompt": "a cat", "metadata": {"prompt": "a cat"}}]
    # A failing publish leaves the previous version untouched and no temp dirs behind.
    with pytest.raises(ValueError):
        formats.publish_prepared(out, {"../escape.jsonl": b"x\n"}, {"format": formats.PREPARED_FORMAT})
    assert formats.read_prepared(out, "ds", "test") == [rec]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]
    # Republishing replaces the directory as a whole.
    formats.publish_prepared(out, {"ds/train.jsonl": formats.encode_prepared([rec])}, {"format": formats.PREPARED_FORMAT})
    assert not (out / "ds" / "test.jsonl").exists()
    # Tampering is detected.
    (out / "ds" / "train.jsonl").write_text("changed\n")
    with pytest.raises(PromptFormatError, match="does not match the manifest"):
        formats.read_manifest(out)


def test_load_prompts_reference_layout_with_cap(tmp_path):
    (tmp_path / "geneval").mkdir()
    formats.write_geneval_jsonl(tmp_path / "geneval" / "test_metadata.jsonl", GENEVAL_ROWS)
    items = formats.load_prompts(tmp_path, "geneval", "test", cap=2, return_metadata=True)
    assert [i["metadata"] for i in items] == GENEVAL_ROWS[:2]
