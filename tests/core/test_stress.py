"""Concurrency stress (issue 8): readers check every sector they read against the
versions that could legally be there while writers, write_zeroes, flushes, snapshot
create/delete/revert, snapshot views and prefetch over a base run in other threads;
then the image is reopened, compared with the model and checked.

FVD_STRESS_SECONDS sets the seconds per configuration (default 3; 2 configurations x 2
implementations in CI). A soak run:

    FVD_STRESS_SECONDS=300 python -m pytest -q -s tests/core/test_stress.py
"""

import os

import pytest

from ..stress import Stress

SECONDS = float(os.environ.get("FVD_STRESS_SECONDS", "3"))


@pytest.mark.parametrize("cache,copy_on_read", [("writeback", False), ("writethrough", True)])
def test_stress(tmp_path, impl, cache, copy_on_read):
    s = Stress(
        str(tmp_path / "stress.fvd"),
        str(tmp_path / "base.raw"),
        SECONDS,
        cache=cache,
        copy_on_read=copy_on_read,
        seed=hash((impl, cache)) & 0xFFFF,
    )
    report = s.run()
    print(f"\nstress {impl} {cache} copy_on_read={copy_on_read}: {report}")
    assert report["wrong"] == 0
    assert report["reads_checked"] > 0 and report["writes"] > 0
    assert report["snapshots"] > 0
