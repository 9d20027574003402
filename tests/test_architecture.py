"""The package's shape, kept true by test: the layers import only downwards, quax's
private API is used in one module, no module grows past ~700 lines, the top-level
`__init__` only re-exports, and the design page's primitive -> module table is
what quax's registry holds for our types."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from quax._dispatch import _rules as quax_rules

import lorax_arrays as lx
from lorax_arrays._core.array import BatchedLoraArray
from lorax_arrays._core.rows import RowIds
from lorax_arrays._integrations.qwix import QwixArray
from lorax_arrays._rules.row_bias import RowBias

PACKAGE = Path(lx.__file__).parent
DESIGN = PACKAGE.parent / "docs" / "design.md"

# Lowest first; a subpackage may import its own layer and the ones before it.
LAYERS = (
    "_core",
    "_rules",
    "_integrations",
    "_adapters",
    "_serving",
    "_training",
    "_io",
)
MAX_LINES = 720


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _dotted(path: Path) -> list[str]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_modules(source: str, module: list[str], is_package: bool) -> list[str]:
    """Every `lorax_arrays...` module that `source` imports (anywhere in it: at the
    top, in functions, under `TYPE_CHECKING`), as dotted names."""
    package = module if is_package else module[:-1]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module:
                target = node.module.split(".")
            else:
                continue
            if target[0] != "lorax_arrays":
                continue
            if node.module is None or len(target) == 1:  # from . import x, y
                out += [".".join([*target, a.name]) for a in node.names]
            else:
                out.append(".".join(target))
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("lorax_arrays")]
    return out


def layer_violations(
    source: str, module: list[str], is_package: bool = False
) -> list[str]:
    """The imports of `source` (the module `module`) that go up the layers."""
    if len(module) < 3 and not (is_package and len(module) == 2):
        return []  # the top-level __init__ may import everything
    own = LAYERS.index(module[1])
    bad = []
    for target in imported_modules(source, module, is_package):
        parts = target.split(".")
        if len(parts) < 2 or parts[1] not in LAYERS:
            bad.append(f"{'.'.join(module)} imports {target} (outside the layers)")
        elif LAYERS.index(parts[1]) > own:
            bad.append(f"{'.'.join(module)} imports {target}, a higher layer")
    return bad


def test_every_module_lives_in_a_layer_with_a_readme():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py")
    assert top == ["__init__.py"]
    dirs = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name[0] == "_")
    assert [d for d in dirs if d != "__pycache__"] == sorted(LAYERS)
    for layer in LAYERS:
        readme = (PACKAGE / layer / "README.md").read_text()
        assert "May import" in readme, layer


def test_layers_import_only_downwards():
    found, bad = set(), []
    for path in _modules():
        module = _dotted(path)
        src = path.read_text()
        is_package = path.name == "__init__.py"
        bad += layer_violations(src, module, is_package)
        found |= {
            (module[1] if len(module) > 1 else "", t.split(".")[1])
            for t in imported_modules(src, module, is_package)
        }
    assert not bad, "\n".join(bad)
    # The scan sees the imports it should (a parser that found none would pass).
    assert {("_rules", "_core"), ("_adapters", "_rules"), ("_io", "_adapters")} <= found
    assert ("_serving", "_adapters") in found and ("_integrations", "_core") in found


def test_the_layer_check_catches_an_upward_import():
    up = "from .._serving.bank import AdapterBank\n"
    assert layer_violations(up, ["lorax_arrays", "_adapters", "loraify"])
    lazy = "def f():\n    from ..._rules import dot\n"
    assert layer_violations(lazy, ["lorax_arrays", "_core", "x", "y"])
    absolute = "import lorax_arrays._io.peft\n"
    assert layer_violations(absolute, ["lorax_arrays", "_serving", "bank"])
    assert not layer_violations(
        "from ..errors import LayoutError\n", ["lorax_arrays", "_core", "x", "y"]
    )


def test_the_core_and_rules_never_import_other_libraries_weight_types():
    for path in _modules():
        module = _dotted(path)
        if len(module) < 2 or module[1] not in ("_core", "_rules"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root not in ("qwix", "orbax"), f"{path}: imports {name}"
                # NNX support is part of quaxify, and imports flax only when an
                # NNX object was met.
                assert root != "flax" or path.name == "nnx.py", path


def test_quax_private_api_only_in_quax_compat():
    allowed = PACKAGE / "_rules" / "quax_compat.py"
    users = set()
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "quax._"
            ):
                users.add(path)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "quax" and node.attr.startswith("_"):
                    users.add(path)
    assert users == {allowed}


def test_no_module_is_too_long():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


def test_init_only_reexports():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body[1:]:  # after the docstring
        assert isinstance(node, ast.ImportFrom), ast.dump(node)[:80]
        for alias in node.names:
            # `from x import y as y`: an explicit re-export.
            assert alias.asname == alias.name, alias.name


# -- the rules table --------------------------------------------------------------

OUR_TYPES = {"BatchedLoraArray": BatchedLoraArray, "RowBias": RowBias,
             "QwixArray": QwixArray}  # fmt: skip


def _design_table() -> set[tuple[str, str, str]]:
    text = DESIGN.read_text()
    body = text.split("<!-- rules-table:start -->")[1].split("<!-- rules-table:end -->")
    rows = [r for r in body[0].strip().splitlines()]
    header = [c.strip().strip("`") for c in rows[0].strip("|").split("|")]
    assert header[0] == "primitive" and set(header[1:]) == set(OUR_TYPES)
    out = set()
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        primitive = re.match(r"`(\w+)`", cells[0]).group(1)
        for type_name, cell in zip(header[1:], cells[1:], strict=True):
            if cell:
                path = cell.strip("`")
                assert (PACKAGE / path).is_file(), path
                module = "lorax_arrays." + path[: -len(".py")].replace("/", ".")
                out.add((primitive, type_name, module))
    return out


def _types_of(signature) -> list[type]:
    found = []
    for t in (*signature.types, signature.varargs):
        for arg in getattr(t, "__args__", (t,)):
            if isinstance(arg, type):
                found.append(arg)
    return found


def _registry() -> set[tuple[str, str, str]]:
    """The rules for our array types; those for `RowIds` (row positions, one
    module for every primitive an activation meets) are `_rows_registry`."""
    out = set()
    for primitive, function in quax_rules.items():
        for method in function.methods:
            module = method.implementation.__module__
            if not module.startswith("lorax_arrays"):
                continue
            types = _types_of(method.signature)
            ours = [n for n, t in OUR_TYPES.items() if t in types]
            if RowIds in types:
                continue
            assert ours, (primitive, module)
            # A rule for one of our types; a rule naming two (BatchedLoraArray on
            # both sides) is listed under the first.
            out.add((primitive.name, ours[0], module))
    return out


def _rows_registry() -> set[str]:
    out = set()
    for primitive, function in quax_rules.items():
        for method in function.methods:
            if RowIds in _types_of(method.signature):
                assert method.implementation.__module__ == "lorax_arrays._rules.rows"
                out.add(primitive.name)
    return out


def _rows_table() -> set[str]:
    text = DESIGN.read_text()
    body = text.split("<!-- rows-rules:start -->")[1].split("<!-- rows-rules:end -->")
    return set(re.findall(r"`([\w-]+)`", body[0]))


def test_the_design_table_is_the_registry():
    table, registry = _design_table(), _registry()
    assert len(registry) > 20
    assert table - registry == set(), "in docs/design.md but not registered"
    assert registry - table == set(), "registered but missing from docs/design.md"


def test_the_row_rules_listed_are_the_registry():
    listed, registry = _rows_table(), _rows_registry()
    assert len(registry) > 60
    assert listed - registry == set(), "in docs/design.md but not registered"
    assert registry - listed == set(), "registered but missing from docs/design.md"


def test_the_table_check_sees_a_missing_row():
    row = ("dot_general", "BatchedLoraArray", "lorax_arrays._rules.dot")
    table = _design_table()
    assert row in table
    assert _registry() - (table - {row}) == {row}


def test_the_package_is_typed():
    # PEP 561: type checkers read our annotations (hatch ships every file under
    # the package, this marker included).
    assert (PACKAGE / "py.typed").is_file()
