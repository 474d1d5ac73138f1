"""Every test runs against both implementations through the `impl` fixture."""

import os
import subprocess
import sys
import tempfile
from xml.etree import ElementTree

import pytest

from fvd import _impl

from . import syscall_recorder

BOTH = ["cython", "python"]


def selected_impl(name):
    """Run under implementation `name` (a generator for fixtures); the compiled one must
    exist where CI or FVD_REQUIRE_CYTHON require it."""
    if name not in _impl.MODULES:
        if os.environ.get("FVD_REQUIRE_CYTHON") == "1" or os.environ.get("CI") == "true":
            pytest.fail("the compiled fast path fvd._fastpath is not built")
        pytest.skip("compiled fast path not built")
    previous = _impl.IMPLEMENTATION
    _impl.select(name)
    yield name
    _impl.select(previous)


@pytest.fixture(params=BOTH, autouse=True)
def impl(request):
    """Select the implementation for the test; compiled one must exist where required."""
    yield from selected_impl(request.param)


_RECORDED = pytest.StashKey[dict]()


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "syscall_recorded: runs in a child pytest with the syscall recorder preloaded"
        " (tests/syscall_recorder)",
    )


def _junit_key(nodeid):
    """(classname, name) of a test in a JUnit XML report."""
    parts = nodeid.split("::")
    module = parts[0][: -len(".py")].replace("/", ".")
    return ".".join([module] + parts[1:-1]), parts[-1]


def _run_recorded(item):
    """Run every selected `syscall_recorded` test of item's module in one child pytest
    under the shim; {junit key: (outcome, message)}."""
    module = item.nodeid.split("::")[0]
    ids = [
        i.nodeid
        for i in item.session.items
        if i.nodeid.split("::")[0] == module and i.get_closest_marker("syscall_recorded")
    ]
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.xml")
        env = dict(os.environ, LD_PRELOAD=syscall_recorder.shim_path())
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        run = subprocess.run(
            cmd + ["-o", "junit_family=xunit1", f"--junitxml={report}", *ids],
            cwd=item.config.rootpath,
            env=env,
            capture_output=True,
            text=True,
        )
        results = {"output": run.stdout + run.stderr}
        if not os.path.exists(report):
            return results
        for case in ElementTree.parse(report).iter("testcase"):
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = child.tag
                    message = f"{child.get('message', '')}\n{child.text or ''}"
            results[case.get("classname"), case.get("name")] = (outcome, message)
    return results


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """A `syscall_recorded` test runs again in a child pytest under LD_PRELOAD (a preload
    cannot be added to a running process), one child for all of a module's selected
    ones; this process reports each test's verdict from the child's JUnit report."""
    if pyfuncitem.get_closest_marker("syscall_recorded") is None or syscall_recorder.loaded():
        return None
    cache = pyfuncitem.config.stash.setdefault(_RECORDED, {})
    module = pyfuncitem.nodeid.split("::")[0]
    if module not in cache:
        cache[module] = _run_recorded(pyfuncitem)
    results = cache[module]
    got = results.get(_junit_key(pyfuncitem.nodeid))
    if got is None:
        pytest.fail(f"no verdict from the syscall recorder's run:\n{results['output']}", False)
    outcome, message = got
    if outcome == "skipped":
        pytest.skip(message.strip())
    if outcome != "passed":
        pytest.fail(f"under the syscall recorder: {message}", pytrace=False)
    return True
