"""The compiled fast path and its pure-Python twin expose the same names and signatures
(the twin must be a drop-in: `fvd._impl` swaps one for the other)."""

import ast
import inspect
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fvd import _purepath

_fastpath = pytest.importorskip("fvd._fastpath")


def public_api(module):
    """{name: object} of the module's own public classes and functions."""
    out = {}
    for name, obj in vars(module).items():
        if name.startswith("_") or isinstance(obj, types.ModuleType):
            continue
        if inspect.isclass(obj) or callable(obj):
            out[name] = obj
    return out


def methods(cls):
    return {
        n: getattr(cls, n) for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))
    }


def signature(fn):
    """Parameter names, kinds, order and defaults (the twin's annotations are checked
    against the stub's in test_twin_annotations_are_the_stubs)."""
    sig = fn if isinstance(fn, inspect.Signature) else inspect.signature(fn)
    params = [p.replace(annotation=p.empty) for p in sig.parameters.values()]
    sig = sig.replace(parameters=params, return_annotation=sig.empty)
    return str(sig).replace("self, ", "").replace("(self)", "()")


def test_same_public_classes_and_functions():
    assert sorted(public_api(_fastpath)) == sorted(public_api(_purepath))


@pytest.mark.parametrize("name", sorted(public_api(_purepath)))
def test_same_methods_and_signatures(name):
    compiled, twin = public_api(_fastpath)[name], public_api(_purepath)[name]
    if not inspect.isclass(twin):
        assert signature(compiled) == signature(twin)
        return
    mc, mt = methods(compiled), methods(twin)
    assert sorted(mc) == sorted(mt)
    for m in mt:
        assert signature(mc[m]) == signature(mt[m]), f"{name}.{m}"


def test_same_stat_fields():
    assert list(_fastpath.STAT_FIELDS) == list(_purepath.STAT_FIELDS)
    assert sorted(_fastpath.Stats().as_dict()) == sorted(_purepath.Stats().as_dict())


# ----- the typed surface: fvd/_fastpath.pyi -----------------------------------------------

STUB = Path(_purepath.__file__).with_name("_fastpath.pyi")
# annotations of the compiled signatures (embedsignature) that name a Python type
PY_TYPES = {"int", "float", "bool", "str", "bytes", "Stats", "ChunkMap", "HostFile"}


def stub_module():
    return ast.parse(STUB.read_text(), filename=str(STUB))


def stub_names(body):
    """{name: node} of the classes, functions and variables a stub body declares."""
    out = {}
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, ast.Assign):
            out.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
    return out


def stub_public():
    return {n: node for n, node in stub_names(stub_module().body).items() if n[0] != "_"}


def stub_all():
    return ast.literal_eval(stub_names(stub_module().body)["__all__"].value)


def is_property(fn):
    return any(isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list)


def ast_signature(fn):
    """The signature an ast.FunctionDef declares, without annotations, as `signature`
    prints one (names, kinds, order, defaults)."""
    a, P = fn.args, inspect.Parameter
    params = []
    positional = a.posonlyargs + a.args
    defaults = [P.empty] * (len(positional) - len(a.defaults)) + [
        ast.literal_eval(d) for d in a.defaults
    ]
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        kind = P.POSITIONAL_ONLY if i < len(a.posonlyargs) else P.POSITIONAL_OR_KEYWORD
        params.append(P(arg.arg, kind, default=default))
    if a.vararg:
        params.append(P(a.vararg.arg, P.VAR_POSITIONAL))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        params.append(
            P(arg.arg, P.KEYWORD_ONLY, default=P.empty if d is None else ast.literal_eval(d))
        )
    if a.kwarg:
        params.append(P(a.kwarg.arg, P.VAR_KEYWORD))
    return signature(inspect.Signature(params))


def embedded(fn):
    """The def a compiled function's docstring starts with (Cython embedsignature)."""
    first = (fn.__doc__ or "").split("\n", 1)[0]
    name = fn.__name__
    assert first.startswith(name + "("), f"no embedded signature on {fn!r}: {first!r}"
    return ast.parse(f"def {first}: pass").body[0]


def stub_class(name):
    return {n: node for n, node in stub_names(stub_public()[name].body).items()}


def test_same_all_in_compiled_twin_and_stub():
    assert list(_fastpath.__all__) == list(_purepath.__all__) == stub_all()


def test_stub_declares_every_public_name():
    """The stub declares exactly what the compiled module exports (its imports aside),
    and the twin has nothing else public but module imports and int constants that
    mirror the compiled module's C-level ones."""
    names = set(stub_all())
    compiled = {n for n, v in vars(_fastpath).items() if n[0] != "_" and not inspect.ismodule(v)}
    assert compiled == names
    assert set(stub_public()) == names
    twin = {n for n, v in vars(_purepath).items() if n[0] != "_" and not inspect.ismodule(v)}
    assert names <= twin
    assert all(type(getattr(_purepath, n)) is int for n in twin - names), twin - names


@pytest.mark.parametrize("cls", ["Stats", "ChunkMap", "HostFile"])
def test_stub_methods_and_signatures(cls):
    """Methods: same names and same signatures (parameter names, kinds, order, defaults)
    in the compiled module, the twin and the stub; constructors included (the compiled
    one's from its embedded signature)."""
    compiled, twin, stub = getattr(_fastpath, cls), getattr(_purepath, cls), stub_class(cls)
    stub_methods = {
        n: f for n, f in stub.items() if isinstance(f, ast.FunctionDef) and not is_property(f)
    }
    stub_methods.pop("__init__")
    assert sorted(stub_methods) == sorted(methods(compiled)) == sorted(methods(twin))
    for m, fn in stub_methods.items():
        assert ast_signature(fn) == signature(getattr(compiled, m)), f"{cls}.{m}"
        assert ast_signature(fn) == signature(getattr(twin, m)), f"{cls}.{m}"
    init = stub["__init__"]
    assert ast_signature(init) == signature(twin.__init__)
    assert ast_signature(init) == ast_signature(embedded(compiled.__init__))


@pytest.mark.parametrize("cls", ["Stats", "ChunkMap", "HostFile"])
def test_stub_types_match_the_compiled_ones(cls):
    """Where a compiled parameter is typed (int, Stats ...), the stub names that type."""
    compiled, stub = getattr(_fastpath, cls), stub_class(cls)
    checked = 0
    for name, fn in stub.items():
        if not isinstance(fn, ast.FunctionDef) or is_property(fn):
            continue
        real = embedded(getattr(compiled, name))
        declared = {a.arg: a.annotation for a in fn.args.args}
        for arg in real.args.args:
            if arg.annotation is None or ast.unparse(arg.annotation) not in PY_TYPES:
                continue
            assert ast.unparse(declared[arg.arg]) == ast.unparse(arg.annotation), (name, arg.arg)
            checked += 1
    assert checked or cls == "Stats"


def instances(tmp_path):
    """One instance of each class from both implementations, built alike."""
    import numpy as np

    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT, 0o600)
    out = []
    for mod in (_fastpath, _purepath):
        st = mod.Stats()
        table = np.full(4, 0xFFFFFFFF, dtype=np.uint32)
        cmap = mod.ChunkMap(fd, table, np.zeros(0, np.uint8), 1 << 16, 0, 4 << 16, st)
        out.append({"Stats": st, "ChunkMap": cmap, "HostFile": mod.HostFile(fd, st)})
    return fd, out


@pytest.mark.parametrize("cls", ["Stats", "ChunkMap", "HostFile"])
def test_stub_attributes(cls, tmp_path):
    """Every attribute and property the stub declares exists on instances of both
    implementations with the declared type (for int, bool and the module's classes), and
    the compiled class has no public attribute the stub lacks."""
    stub = stub_class(cls)
    attrs = {
        n: ast.unparse(node.annotation)
        for n, node in stub.items()
        if isinstance(node, ast.AnnAssign)
    }
    attrs.update(
        {
            n: ast.unparse(f.returns)
            for n, f in stub.items()
            if isinstance(f, ast.FunctionDef) and is_property(f)
        }
    )
    compiled = getattr(_fastpath, cls)
    data = {n for n in dir(compiled) if n[0] != "_" and not callable(getattr(compiled, n))}
    assert data == set(attrs)
    fd, both = instances(tmp_path)
    try:
        for objs, mod in zip(both, (_fastpath, _purepath)):
            obj = objs[cls]
            for name, ann in attrs.items():
                value = getattr(obj, name)  # AttributeError: not there
                if ann in ("int", "bool"):
                    assert type(value) is {"int": int, "bool": bool}[ann], (mod, name, value)
                elif ann in ("Stats", "ChunkMap", "HostFile"):
                    assert isinstance(value, getattr(mod, ann)), (mod, name)
    finally:
        os.close(fd)


def test_stats_fields_in_stub():
    stub = stub_class("Stats")
    assert [n for n, v in stub.items() if isinstance(v, ast.AnnAssign)] == list(
        _purepath.STAT_FIELDS
    )


def test_stubtest_agrees(impl, tmp_path):
    """mypy's stubtest checks the stub against the built module itself."""
    if impl != "cython":
        pytest.skip("one run is enough: stubtest checks the compiled module")
    pytest.importorskip("mypy.stubtest")
    allow = tmp_path / "allowlist"
    allow.write_text("fvd._fastpath.*.__reduce_cython__\nfvd._fastpath.*.__setstate_cython__\n")
    root = Path(_purepath.__file__).parents[1]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy.stubtest",
            "--mypy-config-file",
            str(root / "pyproject.toml"),
            "--allowlist",
            str(allow),
            "fvd._fastpath",
        ],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("seed", range(6))
def test_same_held_mask(seed):
    """held_mask (snapshot bookkeeping): the same mask and count from both, the cap
    refusing a table with an entry at or past it."""
    rnd = np.random.default_rng(seed)
    n = int(rnd.integers(0, 3000))
    table = rnd.permutation(5000)[:n].astype(np.uint32)
    hole = rnd.random(n) < 0.3
    table[hole] = rnd.choice([0xFFFFFFFE, 0xFFFFFFFF], int(hole.sum()))
    top = int(table[~hole].max()) + 1 if (~hole).any() else 0
    caps = ((table, 10, top), (table, 10, max(top - 1, 0)), (table, 0, top + 999))
    for args in ((table, 0), (table, 6000), *caps):
        (mc, cc), (mt, ct) = _fastpath.held_mask(*args), _purepath.held_mask(*args)
        assert cc == ct == n - int(hole.sum())
        if mt is None:
            assert mc is None and len(args) == 3 and top > args[2]
            continue
        assert mc.dtype == mt.dtype == np.uint8
        assert len(mc) == len(mt) == max(args[1], top)
        assert np.array_equal(mc, mt)
        assert np.array_equal(np.flatnonzero(mt), np.unique(table[~hole]))


def test_shared_values_have_one_home():
    """Both paths use fvd._shared's values: the compiled module reads them at import,
    the twin and the on-disk declarations import them."""
    from fvd import _shared
    from fvd.ondisk import fvd_records

    want = {k: getattr(_shared, k) for k in ("ZERO_CHUNK", "NO_SLOT", "MAX_IOV", "SYS_IOV_MAX")}
    assert _fastpath._shared_values() == want
    for name, value in want.items():
        assert getattr(_purepath, name) is value
    assert fvd_records.ZERO_CHUNK is _shared.ZERO_CHUNK


def twin_defs():
    """The twin's classes and functions as declared in fvd/_purepath.py (ast)."""
    tree = ast.parse(Path(_purepath.__file__).read_text())
    return stub_names(tree.body)


def annotations(fn):
    a = fn.args
    args = a.posonlyargs + a.args + a.kwonlyargs
    out = {x.arg: ast.unparse(x.annotation) for x in args if x.annotation is not None}
    out["return"] = ast.unparse(fn.returns) if fn.returns is not None else None
    return out


def test_twin_annotations_are_the_stubs():
    """The twin is typed as the stub types the compiled module: every public class
    method and function declares the stub's annotations, word for word."""
    twin, stub = twin_defs(), stub_public()
    checked = 0
    for name, node in stub.items():
        if isinstance(node, ast.FunctionDef):
            assert annotations(twin[name]) == annotations(node), name
            checked += 1
        elif isinstance(node, ast.ClassDef):
            mine = stub_names(twin[name].body)
            for m, fn in stub_names(node.body).items():
                if isinstance(fn, ast.FunctionDef):
                    assert annotations(mine[m]) == annotations(fn), f"{name}.{m}"
                    checked += 1
    assert checked > 20
