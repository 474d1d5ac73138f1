"""The nightly backup loop (docs/format.md, "Changed extents between snapshots",
Guarantee): constant churn, one snapshot a night, changed extents between consecutive
snapshots report the granules written that night and no more (carried granules keep
their provenance), night after night, and never miss a changed byte."""

import os
import random
import threading
import zlib

import numpy as np
import pytest

import fvd
from fvd.features import snapshots as snap

MiB = 1 << 20
G = 4096
SIZE = 4 * MiB
REGION = 3 * MiB  # the churn stays in here: chunks keep getting rewritten
PAGES = 32  # 4 KiB writes a night
NIGHTS = 30


def reported(arr, size):
    mask = np.zeros(size, dtype=bool)
    for s, n, _f in arr.tolist():
        mask[s : s + n] = True
    return mask


def night(img, rnd, n, region=REGION, pages=PAGES):
    """One night of churn; returns the set of granules written."""
    written = set()
    for _ in range(pages):
        p = rnd.randrange(region // G)
        img.write(p * G, rnd.randbytes(G))
        written.add(p)
    img.create_snapshot(f"n{n}")
    return written


def run_nights(path, cache, delete, reopen=False, region=REGION, pages=PAGES):
    """30 nights; per night (reported bytes / written bytes, missed bytes). `reopen`:
    the image is closed and opened again every night (as `fvd snapshot -c` would)."""
    rnd = random.Random(20)
    out = []
    img = fvd.open(path, "r+", cache=cache)
    try:
        img.write(0, rnd.randbytes(region))
        img.create_snapshot("n0")
        with img.open_snapshot("n0") as v:
            before = np.frombuffer(v.read(0, SIZE), dtype=np.uint8)
        for n in range(1, NIGHTS + 1):
            if reopen:
                img.close()
                img = fvd.open(path, "r+", cache=cache)
            written = night(img, rnd, n, region, pages)
            arr = img.changed_extents(f"n{n - 1}", f"n{n}").array
            with img.open_snapshot(f"n{n}") as v:
                after = np.frombuffer(v.read(0, SIZE), dtype=np.uint8)
            missed = int(((before != after) & ~reported(arr, SIZE)).sum())
            out.append((int(arr["length"].sum()) / (len(written) * G), missed))
            if delete:
                img.delete_snapshot(f"n{n - 1}")
            before = after
    finally:
        img.close()
    return out


def assert_exact_nights(ratios):
    assert all(missed == 0 for _, missed in ratios), ratios
    assert ratios[0][0] == 1.0  # night 1: first writes into whole held chunks
    worst = max(r for r, _ in ratios[1:])
    assert worst <= 1.1, [round(r, 2) for r, _ in ratios]


@pytest.mark.parametrize("delete", [True, False], ids=["delete-old", "keep-old"])
@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_thirty_nights_report_what_was_written(tmp_path, cache, delete):
    path = str(tmp_path / "img.fvd")
    fvd.create(path, SIZE)
    assert_exact_nights(run_nights(path, cache, delete))


def test_thirty_nights_with_a_close_and_open_every_night(tmp_path):
    """A clean close keeps the front's provenance (the partial map's section)."""
    path = str(tmp_path / "img.fvd")
    fvd.create(path, SIZE)
    assert_exact_nights(run_nights(path, "writeback", True, reopen=True))


def test_thirty_nights_with_chunks_completing(tmp_path):
    """Dense churn (2 chunks, 256 writes a night): chunks complete every several nights
    and keep their provenance until the next snapshot, then restart from the held chunk
    (without that, a completing chunk was reported whole: 1.8x on such a night here)."""
    path = str(tmp_path / "img.fvd")
    fvd.create(path, SIZE)
    assert_exact_nights(run_nights(path, "writeback", True, region=2 * MiB, pages=256))


def test_a_carried_granule_written_again_is_reported(tmp_path):
    """The first write into a carried granule takes the slow path and drops its
    provenance (both implementations), so it is reported; one written twice in a night
    is reported once."""
    path = str(tmp_path / "img.fvd")
    fvd.create(path, SIZE)
    with fvd.open(path, "r+") as img:
        img.write(0, b"a" * MiB)
        img.create_snapshot("s0")
        img.write(3 * G, b"b" * G)  # partial chunk 0 (N, S), granule 3 set
        img.create_snapshot("s1")
        img.write(7 * G, b"c" * G)  # copy-forward: granule 3 carried from N
        img.write(3 * G, b"d" * G)  # into the carried granule: no longer carried
        img.write(3 * G, b"e" * G)  # fast path now
        img.create_snapshot("s2")
        got = img.changed_extents("s1", "s2").array.tolist()
        assert got == [(3 * G, G, 1), (7 * G, G, 1)]
        img.write(9 * G, b"f" * G)  # copy-forward again: 3 and 7 carried
        img.create_snapshot("s3")
        assert img.changed_extents("s2", "s3").array.tolist() == [(9 * G, G, 1)]
        # s1 -> s3 spans two copies: granule 7 came via s2's chunk, reported
        assert img.changed_extents("s1", "s3").array.tolist() == [
            (3 * G, G, 1),
            (7 * G, G, 1),
            (9 * G, G, 1),
        ]
        assert img._core.header.incompatible_features & fvd.ondisk.format.INCOMPAT_PROVENANCE


@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_provenance_survives_a_clean_reopen_not_a_crash(tmp_path, cache):
    """The front's provenance goes into the partial map; a clean open takes it back, an
    open after a crash does not (a carried granule may have been rewritten since the map
    was written): then the carried granules are reported (more, never less), and a
    rewritten one is always reported."""
    path = str(tmp_path / "img.fvd")
    fvd.create(path, SIZE)
    with fvd.open(path, "r+", cache=cache) as img:
        img.write(0, b"a" * MiB)
        img.create_snapshot("s0")
        img.write(3 * G, b"b" * G)
        img.create_snapshot("s1")
        img.write(7 * G, b"c" * G)  # granule 3 carried
    with fvd.open(path, "r+", cache=cache) as img:
        assert img._core.header.incompatible_features & fvd.ondisk.format.INCOMPAT_PROVENANCE
        img.create_snapshot("s2")
        assert img.changed_extents("s1", "s2").array.tolist() == [(7 * G, G, 1)]
        img.write(9 * G, b"d" * G)  # copy-forward: 3 and 7 carried
        img.write(3 * G, b"x" * G)  # ... and 3 rewritten: no longer
        img.flush()
        img._crash()
    with fvd.open(path, "r+", cache=cache) as img:
        assert img.read(3 * G, 1) == b"x"
        img.create_snapshot("s3")
        got = img.changed_extents("s2", "s3").array.tolist()
        assert got == [(3 * G, G, 1), (7 * G, G, 1), (9 * G, G, 1)]
        img.write(11 * G, b"e" * G)  # provenance again from here on
        img.create_snapshot("s4")
        assert img.changed_extents("s3", "s4").array.tolist() == [(11 * G, G, 1)]


def test_a_bad_provenance_section_makes_the_record_bad(tmp_path):
    """Unknown flag bits (or an origin out of range) in a granule record make it bad as
    a bad crc does: changed extents over that snapshot raise, check reports it."""
    path = str(tmp_path / "img.fvd")
    fvd.create(path, SIZE)
    with fvd.open(path, "r+") as img:
        img.write(0, b"a" * MiB)
        img.create_snapshot("s0")
        img.write(3 * G, b"b" * G)
        img.create_snapshot("s1")
        img.write(7 * G, b"c" * G)
        img.create_snapshot("s2")  # its record has a provenance section
        e = img._core.snapshot_state.find("s2", path)
        raw = bytearray(os.pread(img._core.fd, e.granules_size, e.granules_offset))
    assert raw[12] == 1 and len(raw) == 16 + 2 * 40
    raw[12] = 3  # an unknown flag
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(raw), e.granules_offset)
    finally:
        os.close(fd)
    _fix_crc(path, "s2", zlib.crc32(raw))
    with fvd.open(path) as img:
        with pytest.raises(fvd.CorruptImageError, match="unknown flags"):
            img.changed_extents("s1", "s2")
        assert img.check().corruptions >= 1


def _fix_crc(path, name, crc):
    """Give snapshot `name`'s entry the record crc `crc` (snapshot table rewritten, its
    own crc too): the record is then bad only by its content."""
    with fvd.open(path, "r+") as img:
        core = img._core
        st = core.snapshot_state
        st.find(name, path).granules_crc = crc
        h = core.header
        raw = snap.encode_table(st.entries, zlib.crc32(st.refcount.astype("<u2").tobytes()))
        os.pwrite(core.fd, raw, h.snapshot_table_offset)
        img._crash()


def test_a_chunk_completed_in_a_night_is_not_reported_whole(tmp_path):
    """A partial chunk whose last granules are written while it has carried granules
    stays partial (every bit set) so the next snapshot records their provenance; the
    next write after that snapshot takes the held chunk whole as its source (a first
    write: nothing copied). Both nights report only what was written."""
    cs = 64 * 1024  # 16 granules
    path = str(tmp_path / "img.fvd")
    fvd.create(path, 4 * cs, chunk_size=cs)
    with fvd.open(path, "r+") as img:
        img.write(0, b"a" * cs)
        img.create_snapshot("s0")
        img.write(0, b"b" * 8 * G)  # granules 0..7
        img.create_snapshot("s1")
        img.write(8 * G, b"c" * 8 * G)  # copy-forward; 0..7 carried; every bit set
        assert img._core.partial.active == 1
        img.create_snapshot("s2")
        assert img.changed_extents("s1", "s2").array.tolist() == [(8 * G, 8 * G, 1)]
        before = img.stats.data_bytes_written
        img.write(3 * G, b"d" * G)
        assert img.stats.data_bytes_written - before == G  # nothing copied
        img.create_snapshot("s3")
        assert img.changed_extents("s2", "s3").array.tolist() == [(3 * G, G, 1)]
        with img.open_snapshot("s3") as v:
            assert v.read(0, cs) == b"b" * 3 * G + b"d" * G + b"b" * 4 * G + b"c" * 8 * G
        img.delete_snapshot("s1")
        img.delete_snapshot("s2")
        assert img.check().ok
    with fvd.open(path) as img:
        assert img.read(0, cs) == b"b" * 3 * G + b"d" * G + b"b" * 4 * G + b"c" * 8 * G
        assert img.check().ok


def test_writers_in_threads_never_make_changed_extents_miss(tmp_path):
    """Two threads write random granules (fast path, slow path for carried granules,
    copy-forwards) while the main thread takes snapshots: between every two consecutive
    snapshots, each byte that differs is reported (the fast path never writes a carried
    granule whose provenance a snapshot could still record)."""
    path = str(tmp_path / "img.fvd")
    fvd.create(path, SIZE)
    region = 2 * MiB
    with fvd.open(path, "r+") as img:
        img.write(0, random.Random(1).randbytes(region))
        img.create_snapshot("n0")
        stop = threading.Event()

        def writer(seed):
            rnd = random.Random(seed)
            while not stop.is_set():
                img.write(rnd.randrange(region // G) * G, rnd.randbytes(G))

        threads = [threading.Thread(target=writer, args=(s,)) for s in (2, 3)]
        for t in threads:
            t.start()
        try:
            for n in range(1, 13):
                before = img.stats.data_writes
                while img.stats.data_writes < before + 40:  # some writes between snapshots
                    stop.wait(0.001)
                img.create_snapshot(f"n{n}")
        finally:
            stop.set()
            for t in threads:
                t.join()
        for n in range(1, 13):
            arr = img.changed_extents(f"n{n - 1}", f"n{n}").array
            with img.open_snapshot(f"n{n - 1}") as a, img.open_snapshot(f"n{n}") as b:
                old = np.frombuffer(a.read(0, region), dtype=np.uint8)
                new = np.frombuffer(b.read(0, region), dtype=np.uint8)
            missed = (old != new) & ~reported(arr, SIZE)[:region]
            assert not missed.any(), (n, int(np.argmax(missed)))
