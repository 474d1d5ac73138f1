"""The FVD paper's headline benchmark in a real Linux guest (issue 22), as one command.

fvd via `fvd serve`, qcow2 and raw via `qemu-nbd` (the same NBD transport) and qcow2
opened by QEMU itself, each on a fresh 2 GiB ext4 image, boots interleaved round-robin:
sync 4 KiB O_DIRECT|O_DSYNC writes and a PostMark-like small-file pass with and without
fsync, measured in the guest (tests/vm/bench.py, the guest kit tests/vm/kit.py).
Prints the table of medians and fvd's ratios (docs/benchmarks.md, "A real guest").

Every boot costs tens of seconds of emulated CPU, so it runs only when asked:

    FVD_GUEST_BENCH=1 pytest -o addopts= -s bench/test_guest_bench.py --benchmark-only
    FVD_GUEST_BENCH=1 FVD_GUEST_BOOTS=5 pytest -o addopts= -s bench/test_guest_bench.py \\
        --benchmark-only --benchmark-json run.json    # every boot's figures in extra_info

FVD_GUEST_BOOTS: boots per contender (default 3: ~5 min here under TCG; the figures in
docs/benchmarks.md are from 5-7). The guest's own ops/s are the results; the time
pytest-benchmark reports is the wall time of the whole run. Same as
`python -m tests.vm.bench --boots N`.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("FVD_GUEST_BENCH") != "1",
    reason="boots real guests for minutes: FVD_GUEST_BENCH=1 runs it",
)


def test_guest_small_files_and_sync_writes(benchmark: Any) -> None:
    from tests.vm import bench as guest
    from tests.vm.kit import GuestUnavailable

    boots = int(os.environ.get("FVD_GUEST_BOOTS", "3"))
    runs: list[tuple[dict[str, Any], guest.Samples]] = []

    def one_run() -> None:
        try:
            runs.append(guest.measure(guest.PLAN, guest.CONTENDERS, boots))
        except GuestUnavailable as e:
            pytest.skip(f"no guest kit: {e}")

    benchmark.group = "guest"
    benchmark.pedantic(one_run, rounds=1, iterations=1)
    run, samples = runs[0]
    benchmark.extra_info.update(run)
    print()
    guest.report(run, samples)
