"""Chooses the compiled fast path or its pure-Python twin.

FVD_PURE_PYTHON=1 selects the twin; so does a missing extension. Tests switch with
`select()` to run every case against both.
"""

import os

from . import _purepath

try:
    from . import _fastpath
except ImportError:  # not built: the twin serves
    _fastpath = None  # type: ignore[assignment]  # (fvd/_fastpath.pyi types the module)

MODULES = {"python": _purepath}
if _fastpath is not None:
    MODULES["cython"] = _fastpath

if os.environ.get("FVD_PURE_PYTHON") == "1" or _fastpath is None:
    IMPLEMENTATION = "python"
else:
    IMPLEMENTATION = "cython"


def select(name):
    """Use `name` ("cython" or "python") for images opened from now on."""
    global IMPLEMENTATION
    if name not in MODULES:
        raise ImportError(f"the {name} implementation is not available (extension not built?)")
    IMPLEMENTATION = name


def module():
    return MODULES[IMPLEMENTATION]


def new_stats():
    return module().Stats()
