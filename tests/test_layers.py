"""Imports go downhill only (README "Architecture"): a short AST walk over ``rtdmd/``.

Every import is read — module level, function-local, ``TYPE_CHECKING`` blocks and
``importlib.import_module("...")`` with a literal name — and each module is mapped to its layer.
An import that goes up a layer, or a cycle between packages (also between peers of one layer),
is reported with the file and line. ``__main__`` modules and the ``python -m rtdmd.infer`` shim
are entry points: they sit in the CLI layer whatever package they live in.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Top to bottom; packages on one row are peers (they may import each other, but not in a cycle).
LAYERS: list[tuple[str, ...]] = [
    ("rtdmd.cli", "rtdmd.plan"),  # plan simulates the trainers: a CLI-level tool
    ("rtdmd.pipeline",),
    ("rtdmd.registry",),
    ("rtdmd.eval",),
    ("rtdmd.train",),
    ("rtdmd.rewards", "rtdmd.data", "rtdmd.lora", "rtdmd.sampling", "rtdmd.metrics"),
    ("rtdmd.algorithms", "rtdmd.backbones"),
    ("rtdmd.dist", "rtdmd.tracking", "rtdmd.progress", "rtdmd.artifacts", "rtdmd.config"),
]
ENTRY_POINTS = ("rtdmd.infer",)  # shims for ``python -m``: CLI layer
TESTING = "rtdmd.testing"  # test doubles: only tests import them; they may import anything

# Upward edges tolerated on purpose: none. (An entry would be (importing package, imported package).)
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def _layer_of(package: str) -> int | None:
    for i, row in enumerate(LAYERS):
        if package in row:
            return i
    return None


def module_name(path: Path, src_root: Path) -> str:
    parts = list(path.relative_to(src_root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(module: str) -> str:
    """``rtdmd.eval.matrix`` -> ``rtdmd.eval``; ``__main__`` modules and shims -> ``rtdmd.cli``."""
    if module.endswith(".__main__") or module in ENTRY_POINTS:
        return "rtdmd.cli"
    return ".".join(module.split(".")[:2])


def _imports(tree: ast.AST, module: str, is_pkg: bool, known: set[str]):
    """Yield ``(line, imported module)`` for every import in ``tree`` (anywhere in the file)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield node.lineno, sub if sub in known else target
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name == "import_module":
                yield node.lineno, node.args[0].value


def check_layers(src_root: Path, top: str = "rtdmd", allowed: set[tuple[str, str]] = frozenset()) -> list[str]:
    """All layering problems under ``src_root/top``: upward imports, unknown packages, package cycles."""
    files = sorted((src_root / top).rglob("*.py"))
    known = {module_name(f, src_root) for f in files}
    problems: list[str] = []
    edges: dict[str, dict[str, str]] = {}  # package -> imported package -> first "file:line"
    for f in files:
        mod = module_name(f, src_root)
        src = package_of(mod)
        tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        for line, target in _imports(tree, mod, f.name == "__init__.py", known):
            if target != top and not target.startswith(top + "."):
                continue  # third-party / stdlib
            if target == top:
                continue  # the package root holds only the version string
            dst = package_of(target)
            where = f"{f.relative_to(src_root)}:{line}"
            if dst == src:
                continue
            if dst == TESTING:
                if src != TESTING:
                    problems.append(f"{where}: {mod} imports the test doubles {target}")
                continue
            if src == TESTING:
                continue
            ls, ld = _layer_of(src), _layer_of(dst)
            if ls is None or ld is None:
                problems.append(f"{where}: {src if ls is None else dst} is in no layer (add it to LAYERS)")
                continue
            edges.setdefault(src, {}).setdefault(dst, where)
            if ld < ls and (src, dst) not in allowed:
                problems.append(f"{where}: {mod} imports {target} — up from {src} to {dst}")
    problems += _cycles(edges, allowed)
    return list(dict.fromkeys(problems))  # one report per line and target, in file order


def _cycles(edges: dict[str, dict[str, str]], allowed) -> list[str]:
    """One report per strongly connected set of packages (Tarjan), ignoring allowed edges."""
    graph = {a: [b for b in bs if (a, b) not in allowed] for a, bs in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[str] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comp = sorted(comp)
                via = "; ".join(f"{a} -> {b} at {edges[a][b]}" for a in comp for b in comp if b in graph.get(a, []))
                out.append(f"import cycle between {', '.join(comp)}: {via}")

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_rtdmd_imports_go_downhill():
    problems = check_layers(ROOT, allowed=ALLOWED_UPWARD)
    assert not problems, "layering violations:\n" + "\n".join(problems)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return tmp_path


def test_checker_reports_a_planted_function_local_upward_import(tmp_path):
    root = _tree(tmp_path, {
        "rtdmd/__init__.py": "",
        "rtdmd/eval/__init__.py": "",
        "rtdmd/eval/matrix.py": "from rtdmd.train import base\n",  # downhill: fine
        "rtdmd/train/__init__.py": "",
        "rtdmd/train/base.py": """
            import torch

            def proof():
                from rtdmd.eval.matrix import run  # upward, hidden in a function
                return run
            """,
    })
    problems = check_layers(root)
    assert len(problems) == 2, problems  # the upward edge, and the train <-> eval cycle it closes
    assert "rtdmd/train/base.py:5: rtdmd.train.base imports rtdmd.eval.matrix — up from rtdmd.train to rtdmd.eval" \
        in problems
    assert problems[1].startswith("import cycle between rtdmd.eval, rtdmd.train")


def test_checker_reports_relative_imports_importlib_strings_and_peer_cycles(tmp_path):
    root = _tree(tmp_path, {
        "rtdmd/__init__.py": "",
        "rtdmd/pipeline/__init__.py": "",
        "rtdmd/pipeline/stages.py": "from ..registry import flow\n",  # downhill, relative
        "rtdmd/registry/__init__.py": "",
        "rtdmd/registry/flow.py": "import importlib\nhook = importlib.import_module('rtdmd.pipeline.stages')\n",
        "rtdmd/data/__init__.py": "from rtdmd.rewards import x\n",
        "rtdmd/rewards/__init__.py": "from rtdmd.data import y\n",
        "rtdmd/mystery/__init__.py": "",
        "rtdmd/config/__init__.py": "import rtdmd.mystery\n",
    })
    problems = check_layers(root)
    assert any(p.startswith("rtdmd/registry/flow.py:2:") and "up from rtdmd.registry to rtdmd.pipeline" in p
               for p in problems), problems
    assert any(p.startswith("import cycle between rtdmd.data, rtdmd.rewards") for p in problems), problems
    assert any("rtdmd.mystery is in no layer" in p for p in problems), problems
    assert any(p.startswith("import cycle between rtdmd.pipeline, rtdmd.registry") for p in problems), problems
    assert len(problems) == 4, problems


def test_entry_point_shims_sit_in_the_cli_layer(tmp_path):
    root = _tree(tmp_path, {
        "rtdmd/__init__.py": "",
        "rtdmd/cli/__init__.py": "from rtdmd.eval import matrix\n",
        "rtdmd/eval/__init__.py": "",
        "rtdmd/eval/matrix.py": "",
        "rtdmd/eval/__main__.py": "from rtdmd.cli import main\n",
        "rtdmd/infer.py": "from rtdmd.cli import main\n",
        "rtdmd/testing/__init__.py": "from rtdmd.cli import main\n",
        "rtdmd/lora/__init__.py": "from rtdmd.testing import s3server\n",
    })
    problems = check_layers(root)
    assert problems == ["rtdmd/lora/__init__.py:1: rtdmd.lora imports the test doubles rtdmd.testing"], problems
