"""Every test runs against both implementations through the `impl` fixture."""

import os
import re
import subprocess
import sys

import pytest

from fvd import _impl

from . import syscall_recorder

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


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "syscall_recorded: runs in a child pytest with the syscall recorder preloaded"
        " (tests/syscall_recorder)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """A `syscall_recorded` test runs again in a child pytest under LD_PRELOAD (a preload
    cannot be added to a running process); this one reports the child's verdict."""
    if pyfuncitem.get_closest_marker("syscall_recorded") is None or syscall_recorder.loaded():
        return None
    env = dict(os.environ, LD_PRELOAD=syscall_recorder.shim_path())
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    run = subprocess.run(
        cmd + [pyfuncitem.nodeid],
        cwd=pyfuncitem.config.rootpath,
        env=env,
        capture_output=True,
        text=True,
    )
    out = run.stdout + run.stderr
    if run.returncode == 0 and re.search(r"\b1 skipped\b", out):
        pytest.skip(out.strip().splitlines()[-1])
    if run.returncode != 0 or not re.search(r"\b1 passed\b", out):
        pytest.fail(f"under the syscall recorder:\n{out}", pytrace=False)
    return True
