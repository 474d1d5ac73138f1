"""The compiled fast path and its pure-Python twin expose the same names and signatures
(the twin must be a drop-in: `fvd._impl` swaps one for the other)."""

import inspect
import types

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
    return str(inspect.signature(fn)).replace("self, ", "").replace("(self)", "()")


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
