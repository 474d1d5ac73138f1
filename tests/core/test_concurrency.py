"""Threads (issue 8): a read never returns bytes nobody wrote; snapshots are points in
time; close while other threads work. See also tests/core/test_stress.py."""

import struct
import threading

import pytest

import fvd
from fvd.units import KiB, MiB


def _reader(img, offset, length, good, stop, seen):
    """Read in a loop; count reads whose bytes are not in `good`."""
    while not stop.is_set():
        try:
            data = img.read(offset, length)
        except ValueError:
            return  # closed under us: allowed
        seen["reads"] += 1
        if data not in good:
            seen["bad"] += 1
            seen["sample"] = data[:16]


def test_reader_never_sees_zeros_while_snapshot_and_write(tmp_path):
    """Regression (issue 8, bug 1): the new chunk was in the table before its data, so
    ~20% of these reads returned zeros that nobody wrote."""
    path = str(tmp_path / "t.fvd")
    fvd.create(path, 64 * MiB)
    data = b"\xab" * (32 * MiB)
    stop, seen = threading.Event(), {"reads": 0, "bad": 0}
    with fvd.open(path, "r+") as img:
        img.write(0, data)
        t = threading.Thread(
            target=_reader, args=(img, 32 * MiB - 4 * KiB, 4 * KiB, {data[: 4 * KiB]}, stop, seen)
        )
        t.start()
        try:
            for _ in range(6):
                img.create_snapshot("t")
                img.write(0, data)
                img.delete_snapshot("t")
        finally:
            stop.set()
            t.join()
    assert seen["reads"] > 0
    assert seen["bad"] == 0, f"{seen['bad']} of {seen['reads']} reads: {seen.get('sample')}"


@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_freed_chunk_reused_never_shows_through(tmp_path, cache):
    """A chunk freed by write_zeroes and reused by another virtual chunk: a reader of the
    first chunk sees its data or zeros, never the other chunk's bytes (grace period)."""
    path = str(tmp_path / "t.fvd")
    cs = 64 * KiB
    fvd.create(path, 64 * cs, chunk_size=cs)
    a, b = b"A" * cs, b"B" * cs
    stop, seen = threading.Event(), {"reads": 0, "bad": 0}
    with fvd.open(path, "r+", cache=cache) as img:
        img.write(0, a)
        readers = [threading.Thread(target=_reader, args=(img, 0, cs, {a, bytes(cs)}, stop, seen))]
        for t in readers:
            t.start()
        try:
            for i in range(60):
                img.write_zeroes(0, cs)  # frees the chunk ...
                img.flush()
                img.write((1 + i % 60) * cs, b)  # ... which another chunk may reuse
                img.write(0, a)
                img.write_zeroes((1 + i % 60) * cs, cs)
        finally:
            stop.set()
            for t in readers:
                t.join()
        img.flush()
        assert img.check().ok
    assert seen["reads"] > 0
    assert seen["bad"] == 0, f"{seen['bad']} of {seen['reads']} reads: {seen.get('sample')}"


def test_snapshot_is_a_point_in_time_under_fast_writes(tmp_path):
    """Writes racing create_snapshot on the fast path (chunk allocated, not yet frozen):
    the snapshot holds a version acknowledged before it returned and no older than the
    last one acknowledged before it began, and it never changes afterwards."""
    path = str(tmp_path / "t.fvd")
    cs = 64 * KiB
    fvd.create(path, 16 * cs, chunk_size=cs)
    stop = threading.Event()
    acked = [0] * 16

    def writer(k):
        n = 0
        while not stop.is_set():
            n += 1
            img.write(k * cs, struct.pack("<Q", n) * (cs // 8))
            acked[k] = n

    with fvd.open(path, "r+") as img:
        for k in range(16):
            img.write(k * cs, bytes(cs))
        threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        try:
            views = []
            for i in range(20):
                before = list(acked)
                img.create_snapshot(f"s{i}")
                after = list(acked)
                view = img.open_snapshot(f"s{i}")
                first = view.read(0, 2 * cs)
                views.append((view, first))
                for k in range(2):
                    chunk = first[k * cs : (k + 1) * cs]
                    n = struct.unpack_from("<Q", chunk)[0]
                    assert chunk == struct.pack("<Q", n) * (cs // 8), "torn chunk"
                    assert before[k] <= n <= after[k] + 1, (before[k], n, after[k])
        finally:
            stop.set()
            for t in threads:
                t.join()
        for view, first in views:
            assert view.read(0, 2 * cs) == first, "a snapshot changed after it was taken"
            view.close()


def test_close_while_threads_read_and_write(tmp_path):
    """close() from one thread while others read and write: calls either complete or
    raise ValueError (closed); the image reopens clean."""
    path = str(tmp_path / "t.fvd")
    fvd.create(path, 8 * MiB, chunk_size=64 * KiB)
    errors = []
    img = fvd.open(path, "r+")
    img.write(0, b"x" * MiB)

    def worker(k):
        i = 0
        try:
            while True:
                i += 1
                if k % 2:
                    img.read((i * 4096) % (8 * MiB - 4096), 4096)
                else:
                    img.write((i * 69632) % (8 * MiB - 4096), b"y" * 4096)
        except ValueError:
            return
        except BaseException as e:  # noqa: BLE001  # anything else is a bug
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    threading.Event().wait(0.2)
    img.close()
    for t in threads:
        t.join()
    assert errors == []
    with fvd.open(path, "r+") as img:
        assert img.read(0, 4096) in (b"x" * 4096, b"y" * 4096)
        assert img.check().ok
