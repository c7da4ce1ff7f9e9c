"""The project's own prompt sets: deterministic, valid, disjoint, commit-sized, in the repo."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from rtdmd.data import builtin, formats, schema
from rtdmd.data.params import load_data_params

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    params = load_data_params(ROOT / "params" / "data.yaml").builtin
    a = tmp_path_factory.mktemp("a") / "prompts"
    builtin.build(a, params)
    return a, params


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_deterministic_and_small(built, tmp_path):
    a, params = built
    b = tmp_path / "again"
    builtin.build(b, params)
    assert _files(a) == _files(b)
    assert sum(len(v) for v in _files(a).values()) < 150_000  # commit-sized
    assert not [p for p in a.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_repo_copy_is_current(built):
    """data/prompts in the repo is exactly what the generator writes (else: dvc repro builtin_prompts)."""
    a, _ = built
    assert _files(ROOT / "data" / "prompts") == _files(a)


def test_geneval_set(built):
    a, _ = built
    train = formats.read_prompts(a / "mini_geneval" / "train_metadata.jsonl")
    test = formats.read_prompts(a / "mini_geneval" / "test_metadata.jsonl")
    for recs in (train, test):
        tags = Counter(r.metadata["tag"] for r in recs)
        assert set(tags) == set(schema.GENEVAL_TAGS) and len(set(tags.values())) == 1  # all six, balanced
        for r in recs:
            assert schema.geneval_errors(r.metadata) == []
            if r.metadata["tag"] == "counting":
                (inc,), (exc,) = r.metadata["include"], r.metadata["exclude"]
                assert 1 <= inc["count"] <= 4 and exc["count"] == inc["count"] + 1
    assert not {r.text for r in train} & {r.text for r in test}
    assert len({r.text for r in train}) == len(train)
    # first 64 test prompts mix tags (the eval cap keeps file order)
    assert len({r.metadata["tag"] for r in test[:64]}) == 6


def test_geneval2_set(built):
    a, _ = built
    train = formats.read_prompts(a / "mini_geneval2" / "train.jsonl")
    test = formats.read_prompts(a / "mini_geneval2" / "test.jsonl")
    assert not {r.text for r in train} & {r.text for r in test}
    for r in train + test:
        m = r.metadata
        assert schema.geneval2_errors(m) == []
        assert 3 <= m["atom_count"] <= 10 and len(m["vqa_list"]) >= m["atom_count"]
        assert all(q.startswith(("How many", "Are there any", "Is the", "Are the")) for q, _ in m["vqa_list"])


def test_ocr_set(built):
    a, _ = built
    train = [r.text for r in formats.read_prompts(a / "mini_ocr" / "train.txt")]
    test = [r.text for r in formats.read_prompts(a / "mini_ocr" / "test.txt")]
    targets = {}
    for split, prompts in (("train", train), ("test", test)):
        found = [re.findall(r'"([^"]*)"', p) for p in prompts]
        assert all(len(f) == 1 and 2 <= len(f[0]) <= 29 for f in found)
        targets[split] = {f[0] for f in found}
    assert not targets["train"] & targets["test"]  # held-out text


def test_general_and_drawbench_like(built):
    a, _ = built
    gen_train = [r.text for r in formats.read_prompts(a / "mini_general" / "train.txt")]
    gen_test = [r.text for r in formats.read_prompts(a / "mini_general" / "test.txt")]
    assert not set(gen_train) & set(gen_test)
    db = [r.text for r in formats.read_prompts(a / "mini_drawbench" / "test.txt")]
    assert 50 <= len(db) == len(set(db)) <= 70
    assert not (a / "mini_drawbench" / "train.txt").exists()


def test_toy2d_prompts_match_the_backbone(built):
    from rtdmd.backbones.toy2d import CLASS_NAMES

    a, _ = built
    assert builtin.TOY2D_CLASSES == tuple(CLASS_NAMES)
    for split in ("train", "test"):  # the bytes rtdmd.eval.prompts.ensure_toy2d_prompts would write
        assert (a / "toy2d" / f"{split}.txt").read_text() == "\n".join(CLASS_NAMES) + "\n"


def test_cli(tmp_path):
    assert builtin.main(["--out", str(tmp_path / "p"), "--params", str(ROOT / "params" / "data.yaml")]) == 0
    assert (tmp_path / "p" / "mini_geneval" / "test_metadata.jsonl").is_file()
