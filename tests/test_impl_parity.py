"""The compiled fast path and its pure-Python twin expose the same names and signatures
(the twin must be a drop-in: `fvd._impl` swaps one for the other)."""

import inspect
import types

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
