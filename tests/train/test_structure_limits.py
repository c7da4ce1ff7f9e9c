"""Size limits that keep the package readable: files in rtdmd/ ≤ 500 lines, functions in rtdmd/train ≤ 60 lines.

The file limit covers the whole package.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "rtdmd"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
OWNED = (".",)  # every file under rtdmd/


def long_files(root: Path, parts, limit: int) -> list[str]:
    out = []
    for part in parts:
        base = root / part
        files = [base] if base.is_file() else sorted(base.rglob("*.py"))
        for f in files:
            n = len(f.read_text().splitlines())
            if n > limit:
                out.append(f"{f.relative_to(root.parent)}: {n} lines")
    return out


def long_functions(root: Path, limit: int) -> list[str]:
    out = []
    for f in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{f.relative_to(root.parents[1])}:{node.lineno} {node.name}: {n} lines")
    return out


def test_files_at_most_500_lines():
    assert long_files(ROOT, OWNED, MAX_FILE_LINES) == []


def test_train_functions_at_most_60_lines():
    assert long_functions(ROOT / "train", MAX_FUNCTION_LINES) == []


def test_the_checks_see_violations(tmp_path):
    pkg = tmp_path / "rtdmd"
    (pkg / "train").mkdir(parents=True)
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (pkg / "train" / "big.py").write_text("def f():\n" + body + "\n" + "\n" * 450)
    assert long_functions(pkg / "train", MAX_FUNCTION_LINES) == ["rtdmd/train/big.py:1 f: 62 lines"]
    assert long_files(pkg, ("train",), MAX_FILE_LINES) == ["rtdmd/train/big.py: 512 lines"]
