"""FVD against the qcow2 baseline (refcount-on-write and lazy refcounts), a plain file and
QEMU (`qemu-img bench` where the offsets have a fixed step, else qemu-io), on every I/O
workload of `fvd bench`; one group per workload.

    pytest bench/test_compare_bench.py --benchmark-only --benchmark-group-by=group
Per-operation I/O counts (writes, bytes, flushes, metadata writes, refcount updates) are in
each benchmark's extra_info (`--benchmark-json=out.json`).
"""

import pytest
from conftest import contender, run_io_benchmark, workload

from fvd.bench import impls
from fvd.bench import workloads as wl

IMPLS = ["fvd", "qcow2", "qcow2-lazy", "raw", "qemu-qcow2", "qemu-qcow2-lazy", "qemu-raw"]
KEYS = [
    "alloc4k-wt",
    "alloc4k-wb",
    "overwrite4k-wt",
    "overwrite4k-wb",
    "read4k",
    "seqwrite1m-wb",
    "seqread1m",
    "cow4k-wt",
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("key", KEYS)
def test_io(benchmark, key, impl, scale, rounds, tmp_path):
    c = contender(impl)
    w = workload(scale, key)
    if w.snapshot and impl.endswith("raw"):
        pytest.skip("raw files have no snapshots")
    counts = run_io_benchmark(benchmark, w, c, tmp_path, rounds)
    if key == "alloc4k-wt" and impl == "fvd":
        # the FVD claim, exact: one journal write and one flush per allocating write
        assert counts["metadata_writes"] <= 1.0
        assert counts["flushes"] <= 1.0


@pytest.mark.parametrize("impl", ["fvd", "qcow2", "qcow2-lazy"])
@pytest.mark.parametrize("what", ["create", "delete"])
def test_snapshots(benchmark, what, impl, scale, tmp_path):
    c = contender(impl)
    count = max(scale.snapshots)
    benchmark.group = f"snapshot-{what}-x{count}"
    cases = []

    def setup():
        case = wl.SnapshotCase(c, str(tmp_path), count, scale.snap_data_ops)
        cases.append(case)
        try:
            case.setup()
            if what == "delete":
                case.create_all()
                case.counts()
        except impls.Unavailable as e:
            case.cleanup()
            pytest.skip(str(e))
        return (case,), {}

    def target(case):
        return case.create_all() if what == "create" else case.delete_all()

    try:
        n = benchmark.pedantic(target, setup=setup, rounds=1)
        assert n == count
        benchmark.extra_info.update(
            {"implementation": impl, "snapshots": count, "counts_per_op": cases[-1].counts()}
        )
    finally:
        for case in cases:
            case.cleanup()
