"""Every "§" citation in the code points to a heading of the method documents in docs/.

Forms understood (in docstrings, comments and strings of ``rtdmd/``, ``bench/``, ``flows/``,
``tests/``):
``§6``, ``§6.4``, ``§3.1.5``, ``§3a``; ranges ``§6–§9``, ``§6-9``, ``§1.1–1.6`` (every section in
between must exist too when both ends share a parent); lists ``§4.1/§5.6``, ``§12.3/4/14``
(a short item replaces the trailing numbers: 12.3, 12.4, 12.14), ``§0 and §3``, ``§7.1, §7.2``.

Which document: an optional ``<name>.md`` right before the "§" names it — ``algorithm.md`` (the
original name of the method specification) and ``method.md`` mean ``docs/method.md``,
``rewards.md`` means ``docs/rewards.md``, ``data_and_eval.md`` means ``docs/data_and_eval.md``,
``DESIGN.md`` means ``docs/DESIGN.md``.
A bare "§" means the method document (not DESIGN.md) last named earlier in the same file (a docstring that opens
with "rewards.md §1.6" keeps talking about rewards.md), and ``docs/method.md`` in a file that
names none; "§4.4 of data_and_eval" names the document of that one citation only. A document
kept outside the repository would go in ``EXTERNAL_DOCS`` (parsed, not resolved).

Paths to documents (``spec/rewards.md``, ``docs/tiny_backbones.md``) must name a file in docs/.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("rtdmd", "bench", "flows", "tests")

#: document name as cited -> file in the repository
DOCS = {
    "algorithm.md": "docs/method.md",
    "method.md": "docs/method.md",
    "rewards.md": "docs/rewards.md",
    "data_and_eval.md": "docs/data_and_eval.md",
    "DESIGN.md": "docs/DESIGN.md",
}
#: the method documents: a bare "§" after one of these in a file refers to it (DESIGN.md does not)
STICKY = {"algorithm.md", "method.md", "rewards.md", "data_and_eval.md"}
#: documents outside the repository whose citations are only parsed, not resolved (none today).
EXTERNAL_DOCS: set[str] = set()

_NUM = r"\d+[a-z]?(?:\.\d+)*"
# optional document name (possibly inside ``...`` or after a path), then the first "§N.M"
_HEAD = re.compile(r"(?:([\w.-]+\.md)`{0,2}\s*)?§\s?(" + _NUM + r")\b")
# what may follow a citation and continue it: a range or list item with or without its own "§"
_TAIL = re.compile(r"\s*(–|-|/|,|\band\b)\s*(§)?\s?(" + _NUM + r")\b")
# a document named after the citation: "§4.4 of data_and_eval" (applies to that citation only)
_OF = re.compile(r"\s+of\s+([A-Za-z_]+)(?:\.md)?\b")


def _expand_short(base: str, item: str) -> str:
    """``12.3`` + ``4`` -> ``12.4``: a shorter item replaces the trailing components."""
    b, i = base.split("."), item.split(".")
    return ".".join(b[: len(b) - len(i)] + i) if len(i) < len(b) else item


def _range(lo: str, hi: str) -> list[str]:
    """Every section from ``lo`` to ``hi`` when both share a parent, else the two ends."""
    a, b = lo.split("."), hi.split(".")
    if len(a) == len(b) and a[:-1] == b[:-1] and a[-1].isdigit() and b[-1].isdigit():
        return [".".join(a[:-1] + [str(k)]) for k in range(int(a[-1]), int(b[-1]) + 1)]
    return [lo, hi]


def citations(text: str, default: str = "method.md"):
    """Yield ``(line_no, doc_name, section, raw)`` for each cited section in ``text``.

    ``doc_name`` is the cited document's name (``None`` never occurs: bare citations take the
    last method document named earlier in the text, else ``default``).
    """
    current = default
    for no, line in enumerate(text.splitlines(), 1):
        pos = 0
        while (m := _HEAD.search(line, pos)) is not None:
            name = m.group(1)
            if name is not None:
                name = name.rsplit("/", 1)[-1]
                if name in STICKY:
                    current = name
            doc = name if name is not None else current
            secs, last, end = [m.group(2)], m.group(2), m.end()
            while (t := _TAIL.match(line, end)) is not None:
                sep, has_mark, item = t.group(1), t.group(2), t.group(3)
                if sep in (",", "and") and not has_mark:
                    break  # "§3, 4 steps" is prose, not a list
                item = item if has_mark else _expand_short(last, item)
                if sep in ("–", "-"):
                    secs += _range(last, item)[1:]
                else:
                    secs.append(item)
                last, end = item, t.end()
            of = _OF.match(line, end)
            if name is None and of is not None and of.group(1) + ".md" in DOCS:
                doc, end = of.group(1) + ".md", of.end()
            raw = line[m.start():end]
            for s in secs:
                yield no, doc, s, raw
            pos = end


def headings(md: Path) -> set[str]:
    """Section numbers of a markdown file's headings: ``## 6. GRPO`` -> ``6``, ``### 6.4 X`` -> ``6.4``."""
    out = set()
    for line in md.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{2,6}\s+(" + _NUM + r")\.?\s", line)
        if m:
            out.add(m.group(1))
    return out


def unresolved(files, root: Path = ROOT) -> list[str]:
    """``path:line: <citation> -> <doc> has no section <N>`` for every citation that does not resolve."""
    heads = {name: headings(root / path) for name, path in DOCS.items()}
    bad = []
    for f in files:
        rel = f.relative_to(root) if f.is_relative_to(root) else f
        for no, doc, sec, raw in citations(f.read_text(encoding="utf-8")):
            if doc in EXTERNAL_DOCS:
                continue
            if doc not in DOCS:
                bad.append(f"{rel}:{no}: {raw!r} cites unknown document {doc}")
            elif sec not in heads[doc]:
                bad.append(f"{rel}:{no}: {raw!r} -> {DOCS[doc]} has no section {sec}")
    return bad


def _scanned_files():
    """Every .py file of SCANNED except this one (its examples are deliberately wrong)."""
    here = Path(__file__).resolve()
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py") if p.resolve() != here)


def test_parser_forms():
    text = "\n".join([
        "x (algorithm.md §6–§9) y §6-7",
        "``spec/rewards.md`` §0 and §3a; §1.1–1.3",
        "z §12.3/4/14, §4.1/§5.6 and data_and_eval.md §4.4–4.5, §3, 4 steps",
        "DESIGN.md §3 then §2.1 (§1.2 of rewards, §1.3 of the spec)",
    ])
    got = [(n, d, s) for n, d, s, _ in citations(text)]
    assert got == [
        (1, "algorithm.md", "6"), (1, "algorithm.md", "7"), (1, "algorithm.md", "8"),
        (1, "algorithm.md", "9"), (1, "algorithm.md", "6"), (1, "algorithm.md", "7"),
        (2, "rewards.md", "0"), (2, "rewards.md", "3a"), (2, "rewards.md", "1.1"),
        (2, "rewards.md", "1.2"), (2, "rewards.md", "1.3"),
        (3, "rewards.md", "12.3"), (3, "rewards.md", "12.4"), (3, "rewards.md", "12.14"),
        (3, "rewards.md", "4.1"), (3, "rewards.md", "5.6"),
        (3, "data_and_eval.md", "4.4"), (3, "data_and_eval.md", "4.5"), (3, "data_and_eval.md", "3"),
        (4, "DESIGN.md", "3"), (4, "data_and_eval.md", "2.1"), (4, "rewards.md", "1.2"),
        (4, "data_and_eval.md", "1.3"),
    ]


def test_every_citation_resolves():
    files = _scanned_files()
    assert len(files) > 50, "scanned too few files: wrong root?"
    n = sum(1 for f in files for _ in citations(f.read_text(encoding="utf-8")))
    assert n > 200, f"only {n} citations found: the parser lost some forms"
    bad = unresolved(files)
    assert not bad, "unresolved § citations:\n" + "\n".join(bad)


_PATH = re.compile(r"\b(spec|docs)/([\w.-]+\.md)\b")


def missing_doc_files(files, root: Path = ROOT) -> list[str]:
    """``path:line: spec/x.md`` for every referenced docs file that does not exist.

    ``spec/`` is the directory the method documents came from: ``spec/algorithm.md`` is now
    ``docs/method.md`` and ``spec/<x>.md`` is ``docs/<x>.md``.
    """
    bad = []
    for f in files:
        rel = f.relative_to(root) if f.is_relative_to(root) else f
        for no, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            for m in _PATH.finditer(line):
                name = DOCS.get(m.group(2), "docs/" + m.group(2)).rsplit("/", 1)[-1]
                if not (root / "docs" / name).is_file():
                    bad.append(f"{rel}:{no}: {m.group(0)} (no docs/{name})")
    return bad


def test_referenced_doc_files_exist(tmp_path):
    bad = missing_doc_files(_scanned_files())
    assert not bad, "references to documents that are not in docs/:\n" + "\n".join(bad)
    planted = tmp_path / "planted.py"
    planted.write_text("# see spec/algorithm.md and docs/rewards.md, spec/nowhere.md\n", encoding="utf-8")
    assert missing_doc_files([planted]) == [f"{planted}:1: spec/nowhere.md (no docs/nowhere.md)"]


@pytest.mark.parametrize("planted, expect", [
    ('"""Adds the bonus (§6.99)."""\n', "docs/method.md has no section 6.99"),
    ("# per rewards.md §7 table\n", "docs/rewards.md has no section 7"),
    ("# see algorithm.md §4.2–§4.9\n", "docs/method.md has no section 4.4"),
    ("# see notes.md §1\n", "cites unknown document notes.md"),
    ('"""Layout (DESIGN.md §9)."""\n', "docs/DESIGN.md has no section 9"),
])
def test_planted_bad_citation_is_reported(tmp_path, planted, expect):
    f = tmp_path / "planted.py"
    f.write_text("x = 1\n" + planted, encoding="utf-8")
    bad = unresolved([f])
    assert len(bad) >= 1 and all(b.startswith(f"{f}:2: ") for b in bad), bad
    assert any(expect in b for b in bad), bad
    good = tmp_path / "good.py"
    good.write_text('"""(§6.4, rewards.md §1.1, data_and_eval.md §4.7)."""\n', encoding="utf-8")
    assert unresolved([good]) == []
