"""Fixtures for the guest tests: the kit (skipped or, under CI, failed when unavailable)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ..conftest import selected_impl
from .kit import GuestUnavailable, Kit, prepare

FULL = os.environ.get("FVD_GUEST_FULL") == "1"


@pytest.fixture(params=["cython", "python"] if FULL else ["cython"], autouse=True)
def impl(request: pytest.FixtureRequest) -> Iterator[str]:
    """Overrides the suite's `impl`: every boot costs seconds of TCG, so the default
    run serves with the compiled fast path only (the twins' parity is tested
    elsewhere); FVD_GUEST_FULL=1 serves with both."""
    yield from selected_impl(request.param)


@pytest.fixture(scope="session")
def kit() -> Kit:
    try:
        return prepare()
    except GuestUnavailable as e:
        reason = f"no guest kit: {e}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " - required when CI=true (.ci/run installs the packages)")
        pytest.skip(reason)
