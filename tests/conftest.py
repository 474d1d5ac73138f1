"""Every test runs against both implementations through the `impl` fixture."""

import os

import pytest

from fvd import _impl

BOTH = ["cython", "python"]


@pytest.fixture(params=BOTH, autouse=True)
def impl(request):
    """Select the implementation for the test; compiled one must exist where required."""
    name = request.param
    if name not in _impl.MODULES:
        if os.environ.get("FVD_REQUIRE_CYTHON") == "1" or os.environ.get("CI") == "true":
            pytest.fail("the compiled fast path fvd._fastpath is not built")
        pytest.skip("compiled fast path not built")
    previous = _impl.IMPLEMENTATION
    _impl.select(name)
    yield name
    _impl.select(previous)
