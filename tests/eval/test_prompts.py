"""Eval prompt loading (data_and_eval.md §4.2): file order, first-N cap, metadata, errors."""
import json

import pytest

from rtdmd.eval.prompts import (EmptyPromptsError, MissingDatasetError, clear_cache, ensure_toy2d_prompts,
                                inline_prompts, load_eval_prompts)


@pytest.fixture(autouse=True)
def _fresh():
    clear_cache()


def test_file_preference_and_first_n_cap(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "prompts.txt").write_text("ignored\n")
    (d / "test.jsonl").write_text("\n".join(json.dumps(x) for x in [{"prompt": "p0", "tag": "a"}, "p1", {"text": "p2"}]))
    (d / "metadata.jsonl").write_text('{"prompt": "ignored"}\n')
    got = load_eval_prompts(tmp_path, "ds", 2)
    assert got.prompts == ["p0", "p1"] and got.total == 3 and got.source.endswith("test.jsonl")
    # eval-side metadata: dict rows whole, string rows {"text": ...}
    assert got.metadata == [{"prompt": "p0", "tag": "a"}, {"text": "p1"}]
    (d / "test.txt").write_text("t0\n\n t1 \nt2")  # test.txt wins; blank lines skipped, stripped
    got = load_eval_prompts(tmp_path, "ds", 0)
    assert got.prompts == ["t0", "t1", "t2"] and got.metadata is None and len(got.sha256) == 64


def test_geneval_metadata_is_kept(tmp_path):
    d = tmp_path / "geneval"
    d.mkdir()
    rows = [{"tag": "counting", "prompt": f"a photo of {i} cats", "include": [{"class": "cat", "count": i}]} for i in (2, 3)]
    (d / "test_metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = load_eval_prompts(tmp_path, "geneval", 64)
    assert got.metadata == rows and got.prompts[1] == "a photo of 3 cats"


def test_missing_dataset_names_reward_and_paths(tmp_path):
    with pytest.raises(MissingDatasetError) as err:
        load_eval_prompts(tmp_path, "ocr", 4, rewards=["ocr"])
    msg = str(err.value)
    assert "'ocr'" in msg and "routed from reward ocr" in msg and str(tmp_path / "ocr") in msg and "test.txt" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_empty_prompt_file_and_inline(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "test.txt").write_text("\n  \n")
    with pytest.raises(EmptyPromptsError, match="holds no prompts"):
        load_eval_prompts(tmp_path, "empty", 4, rewards=["pickscore"])
    with pytest.raises(EmptyPromptsError, match="no prompts given"):
        inline_prompts([], None)
    with pytest.raises(EmptyPromptsError, match="non-empty strings"):
        inline_prompts(["ok", "  "])
    f = tmp_path / "p.txt"
    f.write_text("b\nc\n")
    got = inline_prompts(["a"], f)
    assert got.prompts == ["a", "b", "c"] and got.metadata is None


def test_toy2d_builtin_and_files(tmp_path):
    got = load_eval_prompts(tmp_path, "toy2d", 0)
    assert got.prompts == ["ring", "square", "triangle"] and got.source == "builtin:toy2d"
    d = ensure_toy2d_prompts(tmp_path)
    assert (d / "test.txt").read_text().split() == ["ring", "square", "triangle"] and (d / "train.txt").is_file()
    assert load_eval_prompts(tmp_path, "toy2d", 2).source.endswith("test.txt")


def test_prepared_directory(tmp_path):
    from rtdmd.data.formats import prepared_record, encode_prepared, publish_prepared

    rows = [prepared_record("ds", "test", f"p{i}", None, "src", i + 1) for i in range(3)]
    publish_prepared(tmp_path / "prep", {"ds/test.jsonl": encode_prepared(rows)}, {"format": "rtdmd.prepared_prompts"})
    got = load_eval_prompts(tmp_path / "prep", "ds", 2)
    assert got.prompts == ["p0", "p1"] and got.metadata is None
    with pytest.raises(MissingDatasetError, match="no test split"):
        load_eval_prompts(tmp_path / "prep", "other", 2, rewards=["ocr"])
