"""pytest-benchmark suite: the same workloads as `fvd bench` (fvd.bench.workloads).

Sizes: FVD_BENCH_SCALE multiplies the `fvd bench --quick` sizes (64 random 4 KiB ops,
32 MiB sequential). Default 1, or 0.25 under --benchmark-disable so the suite runs as a
fast smoke test in CI. FVD_BENCH_ROUNDS sets rounds per benchmark (default 3).

    pytest bench/ --benchmark-only --benchmark-group-by=group        # measure
    FVD_BENCH_SCALE=8 pytest bench/ --benchmark-only                  # fvd bench's full size
    pytest bench/ --benchmark-disable                                 # CI smoke test
"""

import os
import statistics
import subprocess
import time

import pytest

from fvd import _impl
from fvd.bench import impls
from fvd.bench import workloads as wl


def _smoke_run(config):
    """True for the default run (pyproject adds --benchmark-disable: every benchmark runs
    once, small, as a smoke test); False when --benchmark-enable/--benchmark-only asks
    for real measurements."""
    try:
        if config.getoption("benchmark_only") or config.getoption("benchmark_enable"):
            return False
        return bool(config.getoption("benchmark_disable"))
    except (ValueError, AttributeError):
        return True


@pytest.fixture(scope="session")
def smoke(pytestconfig):
    """Whether this is a smoke run (small sizes) rather than a measurement."""
    return _smoke_run(pytestconfig)


@pytest.fixture(scope="session")
def scale(smoke):
    default = "0.25" if smoke else "1"
    factor = float(os.environ.get("FVD_BENCH_SCALE", default))
    return wl.Scale.quick().scaled(factor)


@pytest.fixture(scope="session")
def rounds():
    return int(os.environ.get("FVD_BENCH_ROUNDS", "3"))


@pytest.fixture(autouse=True)
def _restore_implementation():
    previous = _impl.IMPLEMENTATION
    yield
    _impl.select(previous)


def contender(name):
    c = impls.BY_NAME[name]
    reason = c.available()
    if reason:
        pytest.skip(f"{name}: {reason}")
    return c


def workload(scale, key):
    for w in wl.io_workloads(scale):
        if w.key == key or w.key.split("-wb/")[0] + "-wb" == key:
            return w
    raise KeyError(key)


def _record(benchmark, w, c, counts):
    benchmark.extra_info.update(
        {
            "implementation": c.name,
            "fvd_backend": _impl.IMPLEMENTATION,
            "workload": w.key,
            "ops_per_round": len(w.offsets),
            "op_bytes": w.length,
            "cache": w.cache,
            "flush_every": w.flush_every,
            "counts_per_op": counts,
        }
    )


def run_io_benchmark(benchmark, w, c, tmpdir, rounds):
    """One workload x contender under benchmark.pedantic, fresh image per round."""
    benchmark.group = w.key
    if not c.python:
        return run_qemu_benchmark(benchmark, w, c, tmpdir, rounds)
    cases, counts = [], {}

    def setup():
        case = wl.IoCase(w, c, str(tmpdir))
        cases.append(case)
        try:
            case.setup()
        except impls.Unavailable as e:
            case.cleanup()
            pytest.skip(str(e))
        return (case,), {}

    def target(case):
        return case.run()

    def teardown(case):
        if not counts:
            assert case.verify(), f"{c.name}: data read back differs after {w.key}"
            counts.update(case.finish())
        else:
            case.cleanup()

    try:
        ops = benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=rounds)
        for case in cases:  # --benchmark-disable skips teardown
            if case.handle is not None:
                teardown(case)
    finally:
        for case in cases:
            case.cleanup()
    assert ops == len(w.offsets)
    _record(benchmark, w, c, counts)
    return counts


def run_qemu_benchmark(benchmark, w, c, tmpdir, rounds):
    """QEMU on the same workload: `qemu-img bench` (QEMU's own loop) where the offsets have
    a fixed step, else qemu-io over the same command script (process start recorded)."""
    from fvd.bench import qemu as bq

    path = os.path.join(str(tmpdir), f"qemu-{c.name}.img")

    def setup():
        try:
            bq.prepare(w, c, path)
        except impls.Unavailable as e:
            pytest.skip(str(e))

    if w.stride() is not None:
        cmd = bq.bench_cmd(w, c, path)
        passes = w.stride()[3]
        loop = []
        benchmark.pedantic(
            lambda: loop.append(sum(bq.bench_seconds(cmd) for _ in range(passes))),
            setup=setup,
            rounds=rounds,
        )
        _record(benchmark, w, c, {})
        benchmark.extra_info["qemu_loop_seconds"] = statistics.median(loop)
        benchmark.extra_info["note"] = (
            "qemu-img bench; time includes process start, qemu_loop_seconds is QEMU's own timing"
        )
        return
    cmd = bq.qemu_io_cmd(c, path, w.cache)
    text = bq.script(w)
    benchmark.pedantic(
        bq.run_tool, args=(), kwargs=None, setup=lambda: setup() or ((cmd, text), {}), rounds=rounds
    )
    start = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(
            cmd, input="", text=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        start.append(time.perf_counter() - t0)
    _record(benchmark, w, c, {})
    benchmark.extra_info["empty_run_seconds"] = statistics.median(start)
    benchmark.extra_info["note"] = "qemu-io; time includes its start: subtract empty_run_seconds"
