"""Snapshot costs (pytest-benchmark): create / delete on a fully allocated 64 GiB image,
open with 1,000 snapshots, and the I/O of the first write after a snapshot.

    python -m pytest bench/test_snapshot_bench.py --benchmark-only

No timed asserts: the numbers go to the report, the I/O counts to extra_info.
"""
import pytest

import fvd

GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10
BIG = 64 * GiB
CS = MiB


def delta(before, after):
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


@pytest.fixture(scope="module")
def full_image(tmp_path_factory):
    """64 GiB, 1 MiB chunks, 4 KiB written into every one of the 65,536 chunks."""
    path = str(tmp_path_factory.mktemp("snapbench") / "full.fvd")
    fvd.create(path, BIG, chunk_size=CS)
    block = b"\xa5" * (4 * KiB)
    with fvd.open(path, "r+") as img:
        for v in range(BIG // CS):
            img.write(v * CS, block)
        img.flush()
        assert img.allocated_chunks == BIG // CS
    return path


def test_create_snapshot_64g_full(benchmark, full_image):
    with fvd.open(full_image, "r+") as img:
        counter = iter(range(10 ** 6))
        img.create_snapshot("keep")             # every chunk already held once

        def setup():
            for s in img.snapshots():
                if s.name != "keep":
                    img.delete_snapshot(s.name)

        def create():
            img.create_snapshot(f"s{next(counter)}")

        benchmark.pedantic(create, setup=setup, rounds=10, iterations=1)
        setup()
        s0 = img.stats.as_dict()
        img.create_snapshot("measured")
        d = delta(s0, img.stats.as_dict())
        benchmark.extra_info.update({f"create_{k}": v for k, v in d.items()})
        img.delete_snapshot("measured")
        img.delete_snapshot("keep")


def test_delete_snapshot_64g_full(benchmark, full_image):
    with fvd.open(full_image, "r+") as img:
        counter = iter(range(10 ** 6))
        names = []
        img.create_snapshot("keep")             # tables are rewritten, not dropped

        def setup():
            names.append(f"d{next(counter)}")
            img.create_snapshot(names[-1])

        def delete():
            img.delete_snapshot(names[-1])

        benchmark.pedantic(delete, setup=setup, rounds=10, iterations=1)
        img.create_snapshot("measured")
        s0 = img.stats.as_dict()
        img.delete_snapshot("measured")
        d = delta(s0, img.stats.as_dict())
        benchmark.extra_info.update({f"delete_{k}": v for k, v in d.items()})
        img.delete_snapshot("keep")


def test_first_write_after_snapshot(benchmark, full_image):
    with fvd.open(full_image, "r+", cache="writethrough") as img:
        img.create_snapshot("base")
        offs = iter(range(0, BIG, CS))

        def write():
            img.write(next(offs) + 100, b"x" * 4096)

        benchmark.pedantic(write, rounds=50, iterations=1)
        s0 = img.stats.as_dict()
        write()
        first = delta(s0, img.stats.as_dict())
        s0 = img.stats.as_dict()
        img.write(next(offs) - CS + 200, b"y" * 4096)  # the chunk the last write copied
        second = delta(s0, img.stats.as_dict())
        benchmark.extra_info.update({f"first_write_{k}": v for k, v in first.items()})
        benchmark.extra_info.update({f"second_write_same_chunk_{k}": v for k, v in second.items()})
        assert first.get("refcount_updates", 0) == 0
        # no copy again; one journal write seals the copy's crc-checked transaction
        assert second.get("data_reads", 0) == 0 and second.get("metadata_writes", 0) == 1
        img.delete_snapshot("base")


@pytest.fixture(scope="module")
def thousand(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("snap1000") / "k.fvd")
    fvd.create(path, 1 * GiB, chunk_size=CS)
    with fvd.open(path, "r+") as img:
        for i in range(1000):
            img.write((i % 1024) * CS, i.to_bytes(4, "little") * 1024)
            img.create_snapshot(f"snapshot-{i:04d}")
    return path


def test_open_with_1000_snapshots(benchmark, thousand):
    def open_close():
        img = fvd.open(thousand)
        n = len(img.snapshots())
        stats = img.stats.as_dict()
        img.close()
        return n, stats

    n, stats = benchmark(open_close)
    assert n == 1000
    benchmark.extra_info.update({f"open_{k}": v for k, v in stats.items() if v})
