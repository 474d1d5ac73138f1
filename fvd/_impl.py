"""Chooses the compiled fast path or its pure-Python twin.

FVD_PURE_PYTHON=1 selects the twin; so does a missing extension. Tests switch with
`select()` to run every case against both.
"""

import importlib
import os
from types import ModuleType
from typing import Any, Optional

from fvd import _purepath

_fastpath: Optional[ModuleType]
try:
    # by name: the compiled module is optional (import-linter sees no Python source)
    _fastpath = importlib.import_module("fvd._fastpath")
except ImportError:  # not built: the twin serves
    _fastpath = None

MODULES: dict[str, Any] = {"python": _purepath}
if _fastpath is not None:
    MODULES["cython"] = _fastpath

if os.environ.get("FVD_PURE_PYTHON") == "1" or _fastpath is None:
    IMPLEMENTATION = "python"
else:
    IMPLEMENTATION = "cython"


def select(name: str) -> None:
    """Use `name` ("cython" or "python") for images opened from now on."""
    global IMPLEMENTATION
    if name not in MODULES:
        raise ImportError(f"the {name} implementation is not available (extension not built?)")
    IMPLEMENTATION = name


def module() -> Any:
    return MODULES[IMPLEMENTATION]


def new_stats() -> Any:
    return module().Stats()
