"""Rules about how the repository's own scripts and tests import things (issue #19),
checked by reading their sources with `ast`:

- `benchmarks/` is a package run as `python -m benchmarks.NAME`: no script edits
  `sys.path`, and none imports a private module of `lorax_arrays` (the public API
  is `import lorax_arrays as lx`), except where named below with its reason;
- no `tests/test_*.py` imports another test file: cases shared between test files
  live in helper modules (`tests/helpers.py`, `tests/model_helpers.py`,
  `tests/peft_helpers.py`, `tests/scripts.py`, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# benchmark -> the private modules it may import, and why.
PRIVATE_ALLOWED = {
    # It times the index guard against the same program without it, so it swaps
    # the guard (`_indices.gathered_scale`, as each rule module imported it) for
    # the unguarded gather: an ablation of an internal, with no public spelling.
    "index_guard.py": {
        "lorax_arrays._core",
        "lorax_arrays._core.array",
        "lorax_arrays._core.indices",
        "lorax_arrays._core.lax",
        "lorax_arrays._rules",
        "lorax_arrays._rules.dot",
        "lorax_arrays._rules.lookup",
    },
    # It times the low-rank term's internal forms (each strategy's and the ones
    # not offered) against each other on one canonical problem: internals, with
    # no public spelling.
    "decode_forms.py": {
        "lorax_arrays._core.indices",
        "lorax_arrays._core.indices.scale_rows",
        "lorax_arrays._core.lax",
        "lorax_arrays._core.lax.take",
        "lorax_arrays._rules",
        "lorax_arrays._rules.strategies",
    },
}


def _imports(tree: ast.AST) -> list[str]:
    """Every module a file imports (`from a import b` gives `a` and `a.b`)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.append(base)
            names += [f"{base}.{alias.name}".lstrip(".") for alias in node.names]
    return names


def _edits_sys_path(tree: ast.AST) -> bool:
    """`sys.path` assigned, augmented, or called on (`insert`, `append`, ...)."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "path"
            and isinstance(node.value, ast.Name)
            and node.value.id == "sys"
        ):
            return True
    return False


def _private(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "lorax_arrays" and any(p.startswith("_") for p in parts[1:])


def test_benchmarks_are_a_package_without_path_edits_or_private_imports():
    bench = ROOT / "benchmarks"
    assert (bench / "__init__.py").exists()
    scripts = sorted(bench.glob("*.py"))
    assert len(scripts) > 5, scripts
    problems = []
    for path in scripts:
        tree = ast.parse(path.read_text(), str(path))
        if _edits_sys_path(tree):
            problems.append(f"{path.name} edits sys.path")
        allowed = PRIVATE_ALLOWED.get(path.name, set())
        for module in _imports(tree):
            if _private(module) and module not in allowed:
                problems.append(f"{path.name} imports {module}")
    assert not problems, problems
    # Each exception is still needed, or it goes.
    for name, allowed in PRIVATE_ALLOWED.items():
        used = set(_imports(ast.parse((bench / name).read_text())))
        assert allowed <= used, (name, allowed - used)


def test_no_test_file_imports_another():
    tests = sorted((ROOT / "tests").glob("test_*.py"))
    names = {p.stem for p in tests}
    problems = []
    for path in tests:
        for module in _imports(ast.parse(path.read_text(), str(path))):
            parts = module.split(".")
            if parts[0] == "tests":
                parts = parts[1:]
            if parts and parts[0] in names:
                problems.append(f"{path.name} imports {module}")
    assert not problems, problems


def test_the_checks_see_what_they_forbid():
    """The scanners catch each forbidden form (so the tests above can fail)."""
    bad_path = [
        "import sys\nsys.path.insert(0, 'x')",
        "import sys\nsys.path[:0] = ['x']",
        "import sys\nsys.path += ['x']",
    ]
    assert all(_edits_sys_path(ast.parse(src)) for src in bad_path)
    assert not _edits_sys_path(ast.parse("import os\nos.path.join('a')"))
    assert [_private(m) for m in _imports(ast.parse("import lorax_arrays as lx"))] == [
        False
    ]
    for src in (
        "from lorax_arrays._strategies import choose",
        "from lorax_arrays import _indices",
        "import lorax_arrays._bank",
    ):
        assert any(_private(m) for m in _imports(ast.parse(src))), src
    for src in ("from tests.test_peft import x", "from tests import test_peft"):
        assert "tests.test_peft" in _imports(ast.parse(src)), src
