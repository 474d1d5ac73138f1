"""The package keeps its architecture (docs/architecture.md): layers (checked by
import-linter in CI and here), no import cycles, function-level imports only for
optional dependencies, no reaching into another package's underscored state, every
exception in fvd.errors and exported from fvd, the documented layers equal to the
enforced ones."""

import ast
import pathlib
import re
import sys

import pytest

import fvd
import fvd.errors

ROOT = pathlib.Path(fvd.__file__).parent
DOCS = ROOT.parent / "docs" / "architecture.md"
PYPROJECT = ROOT.parent / "pyproject.toml"

# nbdkit loads the plugin as a script and its `nbdkit` module exists only there: it
# imports fvd inside functions, after arranging sys.path (see the module docstring).
LAZY_IMPORTS_ALLOWED = {"nbdkit_plugin.py"}
# Optional dependencies, imported where they are used (extras: bench, checksum oracle).
OPTIONAL_DEPENDENCIES = {"matplotlib", "ovirt_imageio"}
# Exceptions that never leave their module: argparse usage errors, skipped bench rows.
# construct's documented context members (`this._params`: parse-time parameters)
CONSTRUCT_CONTEXT = {"_params", "_io", "_root", "_parsing", "_building", "_sizing"}
INTERNAL_EXCEPTIONS = {
    ("cli.py", "UsageError"),
    ("bench/impls.py", "Unavailable"),
    ("bench/nbd.py", "Unavailable"),
}


def sources():
    return sorted(p for p in ROOT.rglob("*.py") if "build" not in p.parts)


def rel(p):
    return p.relative_to(ROOT).as_posix()


def test_no_import_cycles():
    grimp = pytest.importorskip("grimp")
    # imports under `if TYPE_CHECKING:` are annotations (fvd.core.hooks names the core
    # it is typed against), as the import-linter contracts see them
    graph = grimp.build_graph("fvd", exclude_type_checking_imports=True)
    mods = sorted(m for m in graph.modules if m != "fvd")
    edges = {m: {d for d in graph.find_modules_directly_imported_by(m) if d != "fvd"} for m in mods}
    # Tarjan's strongly connected components: any component of two or more is a cycle
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in mods:
        if m not in index:
            visit(m)
    assert cycles == []


def test_function_level_imports_only_for_optional_dependencies():
    """Every import is at module level (under `if TYPE_CHECKING:` at most), so a module's
    dependencies are visible at its top; only optional dependencies load where used."""
    found = []
    for p in sources():
        if rel(p) in LAZY_IMPORTS_ALLOWED:
            continue
        for fn in ast.walk(ast.parse(p.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    mods = ["." * node.level + (node.module or "")]
                else:
                    continue
                if any(m.split(".")[0] not in OPTIONAL_DEPENDENCIES for m in mods):
                    found.append(f"{rel(p)}:{node.lineno} {', '.join(mods)}")
    assert found == []


def _package(p):
    """Private names may be shared inside a subpackage (fvd.qcow2.*), else one module."""
    parts = p.relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else rel(p)


def test_no_reaching_into_another_packages_private_state():
    defined = {}
    for p in sources():
        names = defined.setdefault(_package(p), set())
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    found = []
    for p in sources():
        mine = defined[_package(p)]
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            a = node.attr
            if not a.startswith("_") or a.startswith("__") or a in mine or a in CONSTRUCT_CONTEXT:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            found.append(f"{rel(p)}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_every_exception_lives_in_errors_and_is_exported():
    found = []
    for p in sources():
        if rel(p) == "errors.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                re.search(r"(Error|Exception)$", ast.unparse(b)) for b in node.bases
            ):
                if (rel(p), node.name) not in INTERNAL_EXCEPTIONS:
                    found.append(f"{rel(p)}: {node.name}")
    assert found == []
    errors = {
        n
        for n, v in vars(fvd.errors).items()
        if isinstance(v, type) and issubclass(v, fvd.errors.FvdError)
    }
    assert errors <= set(fvd.__all__)
    assert all(getattr(fvd, n) is getattr(fvd.errors, n) for n in errors)


def _contract_layers():
    text = PYPROJECT.read_text()
    block = text.split('name = "fvd layers"', 1)[1].split("]\n", 1)[0]
    return [
        [m.strip() for m in line.split("|")]
        for line in re.findall(r'"([^"]+)"', block.split("layers = [", 1)[1])
    ]


def test_the_documented_layers_are_the_enforced_ones():
    doc = DOCS.read_text()
    table = re.findall(r"^\| *(\d+[a-z]?) *\| *([^|]+)\|", doc, re.M)
    documented = [[m.strip().strip("`") for m in mods.split(",")] for _, mods in table]
    assert documented == _contract_layers()


def _untyped(fn):
    args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
    args += [a for a in (fn.args.vararg, fn.args.kwarg) if a is not None]
    missing = [a.arg for a in args if a.annotation is None and a.arg not in ("self", "cls")]
    return missing + (["return"] if fn.returns is None else [])


def test_the_package_is_typed():
    """All of fvd is in the strict mypy block (the one [[tool.mypy.overrides]] of
    pyproject.toml), and every function of every module is annotated: the public API,
    the private helpers, the mixins and the functions nested in them."""
    files = list(sources())
    assert {"qcow2/image.py", "core/image.py", "features/granular.py", "_purepath.py"} <= {
        rel(p) for p in files
    }
    found = []
    for p in files:
        for fn in ast.walk(ast.parse(p.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and _untyped(fn):
                found.append(f"{rel(p)}:{fn.lineno} {fn.name}: {', '.join(_untyped(fn))}")
    assert found == []
    blocks = PYPROJECT.read_text().split("[[tool.mypy.overrides]]")
    assert len(blocks) == 2, "one override block: nothing is checked less strictly"
    assert '"fvd.*"' in blocks[1] and "disallow_untyped_defs = true" in blocks[1]


MAX_FUNCTION_LINES = 60


def test_no_function_over_sixty_lines():
    """Small functions (decorators and docstring included in the count)."""
    long = set()
    for p in sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - first + 1 > MAX_FUNCTION_LINES:
                    long.add((rel(p), node.name))
    assert long == set()
