"""Reads do not wait for the I/O of unrelated writes (issue 8): random 4 KiB reads from 2
threads, alone and with a third thread doing allocating writethrough 4 KiB writes (each
one allocates a chunk, journals it and fdatasyncs) elsewhere in the image.

    pytest bench/test_concurrency_bench.py --benchmark-only -s

prints reads/s of both cases and their ratio (target >= 70%); the ratio is also in the
benchmark's extra_info ("read_throughput_kept"). No timed assertion: --benchmark-disable
runs it once as a smoke test.
"""

import random
import statistics
import threading
import time

import pytest

import fvd
from fvd import _impl

MiB = 1 << 20
DATA = 64 * MiB
READS_PER_THREAD = 20000


def _image(tmp_path):
    path = str(tmp_path / "conc.fvd")
    fvd.create(path, 16 << 30)
    with fvd.open(path, "r+") as img:
        block = bytes(range(256)) * 4096
        for off in range(0, DATA, MiB):
            img.write(off, block)
    return path


def _reads(img, n, seed):
    rng = random.Random(seed)
    buf = bytearray(4096)
    for _ in range(n):
        img.readinto(rng.randrange(DATA // 4096) * 4096, buf)


def _writer(img, stop, done):
    off = DATA
    while not stop.is_set():
        img.write(off, b"w" * 4096)  # a new chunk each time: allocating
        off += MiB
        done[0] += 1


def run_case(path, nreads, with_writer):
    """Seconds for 2 threads x nreads random reads; writes done meanwhile."""
    with fvd.open(path, "r+", cache="writethrough") as img:
        stop, done = threading.Event(), [0]
        w = threading.Thread(target=_writer, args=(img, stop, done)) if with_writer else None
        if w:
            w.start()
            time.sleep(0.05)
        readers = [threading.Thread(target=_reads, args=(img, nreads, k)) for k in range(2)]
        t0 = time.perf_counter()
        for t in readers:
            t.start()
        for t in readers:
            t.join()
        elapsed = time.perf_counter() - t0
        stop.set()
        if w:
            w.join()
    return elapsed, done[0]


@pytest.mark.parametrize("impl", ["cython", "python"])
def test_reads_beside_allocating_writes(benchmark, impl, tmp_path):
    if impl not in _impl.MODULES:
        pytest.skip("compiled fast path not built")
    _impl.select(impl)
    disabled = benchmark.disabled
    n = 500 if disabled else READS_PER_THREAD
    rounds = 1 if disabled else 7
    path = _image(tmp_path)
    benchmark.group = "concurrency-reads-beside-writes"
    pairs, writes = [], []

    def target():
        # alone and beside the writer back to back, so machine noise hits both alike
        alone = run_case(path, n, False)[0]
        busy, w = run_case(path, n, True)
        pairs.append((alone, busy))
        writes.append(w)

    benchmark.pedantic(target, rounds=rounds)
    kept = statistics.median(a / b for a, b in pairs)
    alone = statistics.median(a for a, _ in pairs)
    busy = statistics.median(b for _, b in pairs)
    benchmark.extra_info.update(
        {
            "implementation": impl,
            "reads": 2 * n,
            "reads_per_s_alone": 2 * n / alone,
            "reads_per_s_with_writer": 2 * n / busy,
            "read_throughput_kept": kept,
            "writes_per_round": statistics.median(writes),
        }
    )
    print(
        f"\n{impl}: {2 * n / alone:,.0f} reads/s alone, {2 * n / busy:,.0f} reads/s "
        f"beside allocating writethrough writes ({statistics.median(writes):.0f} writes "
        f"per round): {100 * kept:.0f}% kept (median of {len(pairs)} paired rounds)"
    )
