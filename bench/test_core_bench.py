"""Core targets of issue 2: translation rate, readinto and sequential I/O against a plain
file, allocating 4 KiB writethrough writes against pwrite + fdatasync.

Groups put FVD (cython), its python twin and the plain file side by side:
    pytest bench/test_core_bench.py --benchmark-only --benchmark-group-by=group
No timed assertions: the ratios are reported by `fvd bench` and docs/benchmarks.md.
"""

import pytest
from conftest import contender, run_io_benchmark, workload

from fvd.bench import workloads as wl

CORE = ["fvd", "fvd-py", "raw"]


@pytest.mark.parametrize("impl", ["cython", "python"])
def test_translate(benchmark, impl, scale, rounds):
    lookups = scale.translate if impl == "cython" else scale.translate_py
    try:
        cmap, vchunks, out = wl.translate_case(impl, lookups)
    except wl.Unavailable as e:
        pytest.skip(str(e))
    benchmark.group = "core-translate"
    n = benchmark.pedantic(cmap.translate, args=(vchunks, out), rounds=max(rounds, 3))
    assert n == lookups
    assert wl.check_translation(cmap, vchunks, out)
    benchmark.extra_info.update({"implementation": impl, "lookups_per_round": lookups})
    if benchmark.stats is not None:
        benchmark.extra_info["lookups_per_s"] = lookups / benchmark.stats.stats.min


@pytest.mark.parametrize("impl", CORE)
@pytest.mark.parametrize("key", ["read4k", "seqread1m", "seqwrite1m-wb", "alloc4k-wt"])
def test_core_io(benchmark, key, impl, scale, rounds, tmp_path):
    c = contender(impl)
    w = workload(scale, key)
    counts = run_io_benchmark(benchmark, w, c, tmp_path, rounds)
    if key == "alloc4k-wt":
        # exact, hardware-independent costs per allocating writethrough write
        assert counts["flushes"] == pytest.approx(1.0)
        if impl == "raw":
            assert counts["writes"] == pytest.approx(1.0)
